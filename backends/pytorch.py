"""The torch backend: the reference model itself, eager, with its KV cache as tensors."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from glmc.config import Mapping
from glmc.devices import check_device
from glmc.errors import GlmcError
from glmc.model import GLMModel, StaticKVCache
from glmc.run_spec import RunSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchExecutable:
    """The reference model of one rank; every tensor it returns (logits, cache) is on its device,
    and inputs on any device are moved there.

    The KV cache is static (glmc.model.StaticKVCache): buffers for the sequence budget,
    written in place, reordered in place for beam search. Under torch.compile it is the
    functional list of (k, v) instead, whose shapes the compiled graph can follow.
    """

    def __init__(self, model: GLMModel, *, compiled: bool = False, threads: int | None = None):
        self.model = model
        self.threads = threads
        self.config = model.config
        self.mapping = model.mapping
        self.device = model.word_embeddings.weight.device
        self.dtype = model.dtype
        self.static_cache = not compiled
        # torch.compile with dynamic shapes: one graph serves every batch and length.
        self._forward = torch.compile(model, dynamic=True) if compiled else model

    def _inputs(self, tokens, position_ids, attention_mask):
        return (tokens.to(self.device, torch.int64), position_ids.to(self.device, torch.int64),
                attention_mask.to(self.device, torch.bool))

    @torch.no_grad()
    def prefill(self, tokens, position_ids, attention_mask, *, last_only: bool = True, capacity: int | None = None):
        """`capacity`: the positions the cache will hold (context and generation); it grows if passed."""
        cache = None
        if self.static_cache:
            config, (batch, length) = self.config, tokens.shape
            cache = StaticKVCache.allocate(config.num_layers, batch,
                                           config.num_attention_heads // self.mapping.tp_size,
                                           max(length, capacity or 0), config.head_dim, self.dtype, self.device)
        with intra_op_threads(self.threads):
            out = self._forward(*self._inputs(tokens, position_ids, attention_mask), cache,
                                last_logits_only=last_only)
        return out.logits, out.kv_cache

    @torch.no_grad()
    def decode(self, tokens, position_ids, attention_mask, cache):
        """Extends `cache` (a static one in place) and returns it."""
        with intra_op_threads(self.threads):
            out = self._forward(*self._inputs(tokens, position_ids, attention_mask), cache)
        return out.logits, out.kv_cache

    def cache_length(self, cache) -> int:
        return cache.length if isinstance(cache, StaticKVCache) else int(cache[0][0].shape[2])

    def reorder_cache(self, cache, index: torch.Tensor):
        index = index.to(self.device, torch.int64)
        if isinstance(cache, StaticKVCache):
            cache.reorder(index)
            return cache
        return [(k.index_select(0, index), v.index_select(0, index)) for k, v in cache]

    def join_caches(self, caches: list, capacity: int, skip: list[int] | None = None):
        """One cache holding the rows of `caches` in order, each left-padded to the longest
        (padding is masked out by the caller), with room for `capacity` positions; the first
        `skip[i]` positions of cache i (padding in all its rows) are left out."""
        skip = skip or [0] * len(caches)
        length = max(self.cache_length(c) - s for c, s in zip(caches, skip))
        if not self.static_cache:
            return [tuple(torch.cat([_left_pad(t[:, :, s:], length) for t, s in zip(parts, skip)])
                          for parts in zip(*layer))
                    for layer in zip(*(list(c) for c in caches))]
        config = self.config
        joined = StaticKVCache.allocate(config.num_layers, sum(c.batch for c in caches),
                                        config.num_attention_heads // self.mapping.tp_size, max(length, capacity),
                                        config.head_dim, self.dtype, self.device)
        for buffers, name in ((joined.keys, "keys"), (joined.values, "values")):
            for layer, buffer in enumerate(buffers):
                buffer.zero_()
                row = 0
                for cache, s in zip(caches, skip):
                    source = getattr(cache, name)[layer]
                    buffer[row:row + cache.batch, :, length - cache.length + s:length] = source[:, :, s:cache.length]
                    row += cache.batch
        joined.length = length
        return joined

    def cache_tensors(self, cache) -> list[torch.Tensor]:
        return cache.tensors() if isinstance(cache, StaticKVCache) else [t for kv in cache for t in kv]


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[b, heads, n, hd] -> [b, heads, length, hd], zeros first."""
    pad = length - tensor.shape[2]
    return torch.nn.functional.pad(tensor, (0, 0, pad, 0)) if pad else tensor


@contextmanager
def intra_op_threads(threads: int | None):
    """torch's thread count is the process's: set it for this executable's calls only, so that one
    model's setting does not leak into another's (or into the caller's own work)."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compile(source, mapping: Mapping, spec: RunSpec, comm=None, progress=None) -> TorchExecutable:
    from glmc.checkpoint import SatCheckpoint, load_model

    check_device(spec.device)
    dtype = DTYPES[spec.dtype] if spec.dtype else _default_dtype(source, spec.device)
    with intra_op_threads(spec.threads):
        if isinstance(source, SatCheckpoint):
            model = load_model(source, mapping, dtype=dtype, device=spec.device, comm=comm)
        else:  # a package (imported only here: its reader needs onnx, a checkpoint run does not)
            from glmc.graphs import Package

            if not isinstance(source, Package):
                raise GlmcError(f"the torch backend cannot run {type(source).__name__}")
            model = model_from_package(source, mapping, dtype, spec.device, comm)
    return TorchExecutable(model, compiled=spec.torch_compile, threads=spec.threads)


def _default_dtype(source, device: str) -> torch.dtype | None:
    """The source's own dtype (None), except float32 for half-precision weights on CPU: CPUs have no
    fast half matmuls, so the weights are upcast once at load. Every rank decides alike."""
    from glmc.sources import is_checkpoint_source

    own = source.info.float_dtype if is_checkpoint_source(source) else DTYPES[source.dtype]
    return torch.float32 if device.split(":")[0] == "cpu" and own in (torch.float16, torch.bfloat16) else None


def model_from_package(package, mapping: Mapping, dtype, device, comm=None) -> GLMModel:
    """The reference modules fed with the package's weights of `mapping.rank`."""
    if package.tp_size != mapping.tp_size:
        raise GlmcError(f"{package.root}: exported for TP {package.tp_size}, asked to run at TP {mapping.tp_size}")
    dtype = dtype or DTYPES[package.dtype]
    model = GLMModel(package.config, mapping, dtype=dtype, quantization_bits=package.quantization_bits, comm=comm)
    # Float weights take the compute dtype; quantized codes (int8) and their fp16 scales stay as stored.
    state = {name: tensor.to(device=device, dtype=tensor.dtype if _quantized(name, tensor) else dtype)
             for name, tensor in package.state_dict(mapping.rank).items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary_cos, model.rotary_sin = model.rotary_cos.to(device), model.rotary_sin.to(device)
    return model.eval()


def _quantized(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dtype == torch.int8 or name.endswith("_scale")
