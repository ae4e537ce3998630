"""The ONNX Runtime backend: a package's step graph in one session per rank.

One graph serves prefill, decode and full-logit calls (glmc.graphs.trace), so each
weight is prepacked by one session only. ONNX Runtime reads the rank's weight file
itself, memory-mapped from the package's own folder (every external reference was
checked against the package's tensor table when it was opened): the weights it
prepacks are then held once, in its packed layout, and those it reads as they are
(the embedding rows a step looks up) stay pages of the file. Handing it the weights as
OrtValues instead made it copy every one of them. Every tensor lives on the executable's device:
the step's inputs are moved there, the KV cache stays there, and torch sees ONNX
Runtime's outputs through DLPack, without copies, for the all-reduces and the logits.

The KV cache of a `static_kv_cache` package (the onnxruntime target) is a set of
buffers [batch, heads, capacity, head_dim] allocated for the sequence budget and bound
as both the past inputs and the present outputs: GroupQueryAttention writes each
step's keys and values in place (passes/static_kv_cache), and beam search reorders the
rows in place. Other targets' graphs (unfused, tensorrt) concatenate: their cache is
the presents of the last step.
"""

from __future__ import annotations

import importlib.metadata
import time
from dataclasses import dataclass

import onnx
import torch

from glmc.config import Mapping
from glmc.errors import GlmcError
from glmc.graphs.segments import Segment, split
from glmc.model.parallel import Collectives, SingleRank
from glmc.run_spec import RunSpec

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def import_onnxruntime():
    installed = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(dist)
            installed.add(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if len(installed) > 1:
        raise GlmcError("both onnxruntime and onnxruntime-gpu are installed; they overwrite each other's "
                        "module: uninstall both, then install exactly one (glmc[cpu] or glmc[gpu])")
    try:
        import onnxruntime
    except ImportError:
        raise GlmcError("the onnxruntime backend needs ONNX Runtime: pip install 'glmc[cpu]' "
                        "(or 'glmc[gpu]' on CUDA hosts)") from None
    return onnxruntime


@dataclass
class OrtCache:
    """One rank's KV cache: per layer K then V, as torch tensors on the device with the
    OrtValues ONNX Runtime binds (sharing their memory). Static: buffers of `capacity`
    positions, `length` of them filled; otherwise the presents, `length` long."""

    tensors: list[torch.Tensor]
    values: list[object]  # OrtValues over `tensors`
    length: int
    static: bool

    @property
    def capacity(self) -> int:
        return self.tensors[0].shape[2]


class OrtExecutable:
    def __init__(self, package, mapping: Mapping, *, device: str = "cpu", threads: int | None = None,
                 comm: Collectives | None = None):
        ort = import_onnxruntime()
        self.ort, self.package, self.mapping = ort, package, mapping
        self.config = package.config
        self.comm = comm if comm is not None else (SingleRank() if mapping.tp_size == 1 else None)
        if self.comm is None:
            raise GlmcError(f"rank {mapping.rank} of a TP-{mapping.tp_size} package needs collectives")
        kind = device.split(":")[0]
        provider = PROVIDERS.get(kind)
        if provider is None or provider not in ort.get_available_providers():
            hint = " (install glmc[gpu], i.e. onnxruntime-gpu, instead of onnxruntime)" if kind == "cuda" else ""
            raise GlmcError(f"--device {device}: ONNX Runtime here offers only "
                            f"{', '.join(ort.get_available_providers())}{hint}")
        if kind == "cpu" and package.dtype == "bfloat16":
            raise GlmcError(f"{package.root}: a bfloat16 package needs a GPU (ONNX Runtime has no bfloat16 CPU "
                            "kernels for MatMul); export with --dtype float32 or float16 to run on CPU")
        self.device_kind = "cuda" if kind == "cuda" else "cpu"
        self.device_id = int(device.split(":")[1]) if ":" in device else 0
        self.device = torch.device(self.device_kind, self.device_id) if kind == "cuda" else torch.device("cpu")
        self.dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[package.dtype]
        self.static = package.static_kv_cache
        self._dlpack = hasattr(ort.OrtValue, "from_dlpack")
        if kind == "cuda" and not self._dlpack:
            raise GlmcError("--device cuda with ONNX Runtime needs an onnxruntime-gpu whose OrtValue has "
                            "from_dlpack (to keep tensors on the GPU); upgrade onnxruntime-gpu")
        self._tensors = set(package.manifest["ranks"][mapping.rank]["tensors"])
        if kind == "cpu":
            providers = [provider]
        else:
            # ONNX Runtime computes on torch's current stream of this GPU: the step's inputs that
            # torch wrote, ONNX Runtime's outputs that torch all-reduces, ordered without syncs.
            stream = torch.cuda.current_stream(self.device).cuda_stream
            providers = [(provider, {"device_id": self.device_id, "user_compute_stream": str(stream)})]
        # The graph runs as the segments between its AllReduce nodes (one segment at TP 1).
        proto = onnx.load(str(package.graph_path(mapping.rank, "step")), load_external_data=False)
        self.segments: list[tuple[object, Segment]] = [(self._session(segment, providers, threads), segment)
                                                       for segment in split(proto)]
        del proto
        self.run_seconds = 0.0  # time inside ONNX Runtime's runs (the rest: binding, transfers, collectives)
        layers = self.config.num_layers
        self._cache_outputs = [f"present_key_{i}" for i in range(layers)] + [f"present_value_{i}" for i in range(layers)]
        self._cache_inputs = [f"past_key_{i}" for i in range(layers)] + [f"past_value_{i}" for i in range(layers)]
        self._heads = self.config.num_attention_heads // mapping.tp_size

    def _session(self, segment: Segment, providers, threads):
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Weight-only quantized matmuls keep their activations in float: ONNX Runtime would fuse a
        # DequantizeLinear + MatMul into a MatMulNBits that quantizes them to int8 (level 4).
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads:
            options.intra_op_num_threads = threads
        names = [t.name for t in segment.model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        # Every external weight is in the package's tensor table (Package.open checked each reference
        # against it), and ONNX Runtime resolves them in the rank's own folder, never the current one.
        unknown = [n for n in names if n not in self._tensors]
        if unknown:
            raise GlmcError(f"{self.package.root}: graph weight {unknown[0]} is not in rank {self.mapping.rank}'s "
                            "tensor table")
        folder = self.package.weights_path(self.mapping.rank).parent
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        return self.ort.InferenceSession(segment.model.SerializeToString(), options, providers=providers)

    # Tensors cross between torch and ONNX Runtime without copies, on either device: DLPack
    # both ways (numpy views on CPU).
    def _to_ort(self, tensor: torch.Tensor):
        if self._dlpack:
            return self.ort.OrtValue.from_dlpack(tensor)
        return self.ort.OrtValue.ortvalue_from_numpy(tensor.numpy())  # CPU only (checked at start)

    def _to_torch(self, value) -> torch.Tensor:
        """A torch view of an OrtValue on this device (valid while `value` lives)."""
        return torch.from_dlpack(value) if self._dlpack else torch.from_numpy(value.numpy())

    def _bind_input(self, binding, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            if self.device_kind == "cpu":  # a host array binds as it is: cheaper than wrapping it first
                binding.bind_cpu_input(name, value.contiguous().numpy())
                return
            value = self._to_ort(value.contiguous())
        binding.bind_ortvalue_input(name, value)

    def _run(self, feeds: dict[str, torch.Tensor], cache: OrtCache) -> tuple[torch.Tensor, list]:
        """One run of the step graph: the logits, and the cache outputs (the static buffers
        themselves when the cache is static, the presents otherwise)."""
        # torch tensors (the step's inputs, all-reduced sums) and OrtValues (the cache, segment
        # outputs) side by side, all on this device.
        values: dict[str, object] = dict(feeds)
        values.update(zip(self._cache_inputs, cache.values))
        in_place = dict(zip(self._cache_outputs, cache.values)) if cache.static else {}
        for session, segment in self.segments:
            binding = session.io_binding()
            for name in segment.inputs:
                self._bind_input(binding, name, values[name])
            for name in segment.outputs:
                if name in in_place:  # the present is the past's own buffer: written in place
                    binding.bind_ortvalue_output(name, in_place[name])
                else:
                    binding.bind_output(name, self.device_kind, self.device_id)
            start = time.perf_counter()
            session.run_with_iobinding(binding)
            self.run_seconds += time.perf_counter() - start
            values.update(zip(segment.outputs, binding.get_outputs()))
            for source, target in segment.all_reduces:
                # A fresh tensor: the collective sums in place, the segment's output stays as it was.
                values[target] = self.comm.all_reduce(self._to_torch(values[source]).clone())
        # The logits leave as a tensor of their own (not a view of ONNX Runtime's buffer).
        logits = self.comm.all_gather_last(self._to_torch(values["logits"]).clone())
        return logits, [values[name] for name in self._cache_outputs]

    def _inputs(self, tokens, position_ids, attention_mask, logit_positions) -> dict[str, torch.Tensor]:
        """The step's inputs on this device, whatever device and integer type they came in."""
        return {"tokens": tokens.to(self.device, torch.int64),
                "position_ids": position_ids.to(self.device, torch.int64),
                "attention_mask": attention_mask.to(self.device, torch.bool),
                "logit_positions": logit_positions.to(self.device, torch.int64)}

    def _empty(self, batch: int, capacity: int) -> OrtCache:
        shape = (batch, self._heads, capacity, self.config.head_dim)
        tensors = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self._cache_inputs]
        return OrtCache(tensors, [self._to_ort(t) for t in tensors], 0, self.static)

    def _step(self, tokens, position_ids, attention_mask, cache: OrtCache, logit_positions) -> torch.Tensor:
        """Run the graph over `cache` and extend it (in place when static)."""
        new = tokens.shape[1]
        if cache.static:
            self._reserve(cache, cache.length + new)
            if new > 1 and cache.length > 0 and tokens.shape[0] > 1:
                # GroupQueryAttention takes several new tokens over a past for one row at a time.
                rows = [self._step_row(cache, r, tokens, position_ids, attention_mask, logit_positions)
                        for r in range(tokens.shape[0])]
                cache.length += new
                return torch.cat(rows)
        feeds = self._inputs(tokens, position_ids, attention_mask, logit_positions)
        logits, outputs = self._run(feeds, cache)
        if not cache.static:
            cache.values, cache.tensors = outputs, [self._to_torch(v) for v in outputs]
        cache.length += new
        return logits

    def _step_row(self, cache: OrtCache, row: int, tokens, position_ids, attention_mask, logit_positions):
        views = [t[row:row + 1] for t in cache.tensors]  # contiguous: a row of a [b, ...] buffer
        one = OrtCache(views, [self._to_ort(v) for v in views], cache.length, True)
        feeds = self._inputs(tokens[row:row + 1], position_ids[row:row + 1],
                             attention_mask[row:row + 1] if attention_mask.shape[0] > 1 else attention_mask,
                             logit_positions)
        return self._run(feeds, one)[0]

    def _reserve(self, cache: OrtCache, length: int) -> None:
        """Room for `length` positions: the buffers double (one copy, amortised) when full."""
        if length <= cache.capacity:
            return
        grown = self._empty(cache.tensors[0].shape[0], max(length, 2 * cache.capacity))
        for old, new in zip(cache.tensors, grown.tensors):
            new[:, :, :cache.length] = old[:, :, :cache.length]
        cache.tensors, cache.values = grown.tensors, grown.values

    def prefill(self, tokens, position_ids, attention_mask, *, last_only: bool = True, capacity: int | None = None):
        """`capacity`: the positions the cache will hold (context and generation); it grows if passed."""
        length = tokens.shape[1]
        cache = self._empty(tokens.shape[0], max(length, capacity or 0) if self.static else 0)
        positions = torch.tensor([length - 1]) if last_only else torch.arange(length)
        return self._step(tokens, position_ids, attention_mask, cache, positions), cache

    def decode(self, tokens, position_ids, attention_mask, cache: OrtCache):
        """Logits of every new position; `cache` is extended (in place when static) and returned."""
        return self._step(tokens, position_ids, attention_mask, cache, torch.arange(tokens.shape[1])), cache

    def cache_length(self, cache: OrtCache) -> int:
        return cache.length

    def reorder_cache(self, cache: OrtCache, index: torch.Tensor) -> OrtCache:
        rows = index.to(self.device, torch.int64)
        if cache.static and rows.numel() == cache.tensors[0].shape[0]:
            for tensor in cache.tensors:  # in place, over the filled positions only
                live = tensor[:, :, :cache.length]
                live.copy_(live.index_select(0, rows))
            return cache
        tensors = [t.index_select(0, rows) for t in cache.tensors]
        return OrtCache(tensors, [self._to_ort(t) for t in tensors], cache.length, cache.static)

    def join_caches(self, caches: list[OrtCache], capacity: int, skip: list[int] | None = None) -> OrtCache:
        """One cache holding the rows of `caches` in order, each left-padded to the longest
        (padding is masked out by the caller), with room for `capacity` positions; the first
        `skip[i]` positions of cache i (padding in all its rows) are left out."""
        skip = skip or [0] * len(caches)
        length = max(c.length - s for c, s in zip(caches, skip))
        batch = sum(c.tensors[0].shape[0] for c in caches)
        joined = self._empty(batch, max(length, capacity) if self.static else length)
        for i, tensor in enumerate(joined.tensors):
            row = 0
            for cache, s in zip(caches, skip):
                rows = cache.tensors[i].shape[0]
                tensor[row:row + rows, :, length - cache.length + s:length] = cache.tensors[i][:, :, s:cache.length]
                row += rows
        joined.length = length
        return joined

    def cache_tensors(self, cache: OrtCache) -> list[torch.Tensor]:
        """The cache as torch views of its filled positions (for tests and tools that check where it lives)."""
        return [t[:, :, :cache.length] for t in cache.tensors]


def compile(source, mapping: Mapping, spec: RunSpec, comm: Collectives | None = None, progress=None) -> OrtExecutable:
    from glmc.graphs import Package

    if not isinstance(source, Package):
        raise GlmcError("the onnxruntime backend runs compiled packages: export one with `glmc export`")
    if source.tp_size != mapping.tp_size:
        raise GlmcError(f"{source.root}: exported for TP {source.tp_size}, asked to run at TP {mapping.tp_size}")
    if spec.dtype is not None and spec.dtype != source.dtype:
        raise GlmcError(f"{source.root}: exported in {source.dtype}; --dtype {spec.dtype} needs another export")
    return OrtExecutable(source, mapping, device=spec.device, threads=spec.threads, comm=comm)
