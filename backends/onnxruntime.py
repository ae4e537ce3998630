"""The ONNX Runtime backend: a package's prefill and decode graphs in two sessions.

Both sessions read one rank's weights from one memory-mapped file (given to ONNX
Runtime as external initializers). Every tensor lives on the executable's device:
the step's inputs are moved there, the KV cache stays in OrtValues there, bound
through IO binding from one step to the next (beam search reorders it with a
gather on the device), and torch sees ONNX Runtime's outputs through DLPack,
without copies, for the all-reduces and the logits.
"""

from __future__ import annotations

import importlib.metadata
import time

import numpy as np
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
        self._dlpack = hasattr(ort.OrtValue, "from_dlpack")
        if kind == "cuda" and not self._dlpack:
            raise GlmcError("--device cuda with ONNX Runtime needs an onnxruntime-gpu whose OrtValue has "
                            "from_dlpack (to keep tensors on the GPU); upgrade onnxruntime-gpu")
        # One memory map of the rank's weights, shared by every session.
        self._weights = np.memmap(package.weights_path(mapping.rank), dtype=np.uint8, mode="r")
        self._int4_buffers: list[np.ndarray] = []  # see _ort_value; must outlive the sessions too
        self._initializers = {  # must outlive the sessions
            name: self._ort_value(name) for name in package.manifest["ranks"][mapping.rank]["tensors"]}
        if kind == "cpu":
            providers = [provider]
        else:
            # ONNX Runtime computes on torch's current stream of this GPU: the step's inputs that
            # torch wrote, ONNX Runtime's outputs that torch all-reduces, ordered without syncs.
            stream = torch.cuda.current_stream(self.device).cuda_stream
            providers = [(provider, {"device_id": self.device_id, "user_compute_stream": str(stream)})]
        # Each graph runs as the segments between its AllReduce nodes (one segment at TP 1).
        self.graphs: dict[str, list[tuple[object, Segment]]] = {}
        for graph in ("prefill", "decode"):
            proto = onnx.load(str(package.graph_path(mapping.rank, graph)), load_external_data=False)
            self.graphs[graph] = [(self._session(segment, providers, threads), segment) for segment in split(proto)]
        self.run_seconds = 0.0  # time inside ONNX Runtime's runs (the rest: binding, transfers, collectives)
        layers = self.config.num_layers
        self._cache_outputs = [f"present_key_{i}" for i in range(layers)] + [f"present_value_{i}" for i in range(layers)]
        self._cache_inputs = [f"past_key_{i}" for i in range(layers)] + [f"past_value_{i}" for i in range(layers)]

    def _ort_value(self, name: str):
        rank = self.mapping.rank
        array = self.package.tensor(rank, name, self._weights)
        entry = self.package.manifest["ranks"][rank]["tensors"][name]
        if entry["dtype"] != "INT4":
            return self.ort.OrtValue.ortvalue_from_numpy(array)
        # Packed int4, which numpy has no type for: ONNX Runtime takes a buffer of the element shape
        # and reads the packed bytes from its front, without copying it.
        buffer = np.zeros(entry["shape"], dtype=np.uint8)
        buffer.reshape(-1)[: array.size] = array.reshape(-1)
        self._int4_buffers.append(buffer)
        return self.ort.OrtValue.ortvalue_from_numpy_with_onnx_type(buffer, onnx.TensorProto.INT4)

    def _session(self, segment: Segment, providers, threads):
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Weight-only quantized matmuls keep their activations in float: ONNX Runtime would fuse a
        # DequantizeLinear + MatMul into a MatMulNBits that quantizes them to int8 (level 4).
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads:
            options.intra_op_num_threads = threads
        names = [t.name for t in segment.model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        # Every external weight comes from the package's tensor table (checked by Package.open):
        # ONNX Runtime, given the graph as bytes, would resolve any other against the current directory.
        unknown = [n for n in names if n not in self._initializers]
        if unknown:
            raise GlmcError(f"{self.package.root}: graph weight {unknown[0]} is not in rank {self.mapping.rank}'s "
                            "tensor table")
        options.add_external_initializers(names, [self._initializers[n] for n in names])
        return self.ort.InferenceSession(segment.model.SerializeToString(), options, providers=providers)

    # Tensors cross between torch and ONNX Runtime without copies, on either device: DLPack
    # both ways. Inputs come in as torch tensors on this executable's device; outputs stay
    # OrtValues on it (the KV cache is never copied to the host), viewed as torch tensors
    # where torch needs them (all-reduce, logits).
    def _to_ort(self, tensor: torch.Tensor):
        tensor = tensor.contiguous()
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
            value = self._to_ort(value)
        binding.bind_ortvalue_input(name, value)

    def _run(self, graph: str, feeds: dict[str, torch.Tensor], cache=None):
        # torch tensors (the step's inputs, all-reduced sums) and OrtValues (the cache, segment
        # outputs) side by side, all on this device.
        values: dict[str, object] = dict(feeds)
        if cache is not None:
            values.update(zip(self._cache_inputs, cache))
        for session, segment in self.graphs[graph]:
            binding = session.io_binding()
            for name in segment.inputs:
                self._bind_input(binding, name, values[name])
            for name in segment.outputs:
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

    def _inputs(self, tokens, position_ids, attention_mask) -> dict[str, torch.Tensor]:
        """The step's inputs on this device, whatever device and integer type they came in."""
        return {"tokens": tokens.to(self.device, torch.int64),
                "position_ids": position_ids.to(self.device, torch.int64),
                "attention_mask": attention_mask.to(self.device, torch.bool)}

    def prefill(self, tokens, position_ids, attention_mask, *, last_only: bool = True):
        if last_only:
            return self._run("prefill", self._inputs(tokens, position_ids, attention_mask))
        # Every position's logits: the decode graph over an empty past.
        heads = self.config.num_attention_heads // self.mapping.tp_size
        empty = torch.zeros(tokens.shape[0], heads, 0, self.config.head_dim, dtype=self.dtype, device=self.device)
        cache = [self._to_ort(empty) for _ in self._cache_inputs]
        return self._run("decode", self._inputs(tokens, position_ids, attention_mask), cache)

    def decode(self, tokens, position_ids, attention_mask, cache):
        return self._run("decode", self._inputs(tokens, position_ids, attention_mask), cache)

    def cache_length(self, cache) -> int:
        return int(cache[0].shape()[2])

    def reorder_cache(self, cache, index: torch.Tensor):
        rows = index.to(self.device, torch.int64)
        return [self._to_ort(self._to_torch(value).index_select(0, rows)) for value in cache]

    def cache_tensors(self, cache) -> list[torch.Tensor]:
        """The cache as torch views (for tests and tools that check where it lives)."""
        return [self._to_torch(value) for value in cache]


def compile(source, mapping: Mapping, spec: RunSpec, comm: Collectives | None = None,
            progress=None) -> OrtExecutable:
    from glmc.graphs import Package

    if not isinstance(source, Package):
        raise GlmcError("the onnxruntime backend runs compiled packages: export one with `glmc export`")
    if source.tp_size != mapping.tp_size:
        raise GlmcError(f"{source.root}: exported for TP {source.tp_size}, asked to run at TP {mapping.tp_size}")
    if spec.dtype is not None and spec.dtype != source.dtype:
        raise GlmcError(f"{source.root}: exported in {source.dtype}; --dtype {spec.dtype} needs another export")
    return OrtExecutable(source, mapping, device=spec.device, threads=spec.threads, comm=comm)
