"""The PyTorch reference model (also the training model)."""

from glmc.model.kv_cache import StaticKVCache
from glmc.model.transformer import GLMModel, KVCache, ModelOutput

__all__ = ["GLMModel", "KVCache", "ModelOutput", "StaticKVCache"]
