"""The torch backend: the reference model itself, eager, with its KV cache as tensors."""

from __future__ import annotations

import torch

from glmc.config import Mapping
from glmc.errors import GlmcError
from glmc.model import GLMModel, KVCache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchExecutable:
    def __init__(self, model: GLMModel):
        self.model = model
        self.config = model.config
        self.mapping = model.mapping

    @torch.no_grad()
    def prefill(self, tokens, position_ids, attention_mask, *, last_only: bool = True):
        out = self.model(tokens, position_ids, attention_mask, last_logits_only=last_only)
        return out.logits, out.kv_cache

    @torch.no_grad()
    def decode(self, tokens, position_ids, attention_mask, cache: KVCache):
        out = self.model(tokens, position_ids, attention_mask, cache)
        return out.logits, out.kv_cache

    def reorder_cache(self, cache: KVCache, index: torch.Tensor) -> KVCache:
        return [(k.index_select(0, index), v.index_select(0, index)) for k, v in cache]


def compile(source, mapping: Mapping, options) -> TorchExecutable:
    from glmc.checkpoint import SatCheckpoint, load_model

    if not isinstance(source, SatCheckpoint):
        raise GlmcError(f"the torch backend cannot run {type(source).__name__}")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise GlmcError("--device cuda: no CUDA device is available to PyTorch on this machine")
    dtype = DTYPES[options.dtype] if options.dtype else None
    return TorchExecutable(load_model(source, mapping, dtype=dtype, device=options.device))
