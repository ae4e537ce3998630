"""The TensorRT backend: a `--target tensorrt` package's graphs built into TensorRT engines, per rank.

Per rank, TensorRT's ONNX parser reads the step graph (prefill and decode in one) into a
strongly typed network, so every tensor keeps the graph's dtype and the FP32 casts
around each softmax hold. The rank's weights are handed to the parser from the
package's own weights file (`load_initializer` on views of it; an older parser reads
the graph from its place in the package), never from a path the graph names. One
optimisation profile covers what generation asks (`profile_shapes`: batch 1..B,
context 1..max positions, past 0..max positions - 1). Weight-only int8/int4
(DequantizeLinear feeding MatMul) parse the same way: nothing here depends on a
weight's dtype.

Tensor parallelism: each glmc.AllReduce becomes a DistCollective ALL_REDUCE layer
inside the engine (TensorRT >= 11), on the NCCL communicator of torch.distributed's
group; where that is missing (an older TensorRT, a torch without `_comm_ptr`), each
graph runs as engine segments cut at its AllReduce nodes, summed by torch.distributed
between them, as the ONNX Runtime backend does. `collectives` says which runs.

Engines are built once and kept in a cache folder (`EngineCache`, default
~/.cache/glmc/engines, never inside the package), keyed by everything that makes an
engine; the timing cache is kept beside them. Builds report progress and their time
through the `progress` callback `backends.open_rank` passes; TensorRT's own messages go to the Python logger
`glmc.backends.tensorrt`, and its errors into the one-line error of a failed build.

Everything runs on torch's current CUDA stream: inputs, the KV cache and outputs are
torch tensors bound by address; beam search reorders the cache in place. The parts
that need no GPU (preflight, profiles, cache keys, the AllReduce lowering, segments,
the weight hand-over) are plain functions, tested on CPU.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import logging
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx.shape_inference
import onnx.utils
import torch

from glmc.config import GLMConfig, Mapping
from glmc.devices import check_device, parse_device
from glmc.errors import GlmcError
from glmc.fileio import read_json, write_text_atomic
from glmc.graphs.ops import ALL_REDUCE, DOMAIN
from glmc.graphs.segments import Segment, split
from glmc.model.parallel import Collectives, SingleRank
from glmc.run_spec import RunSpec

LOG = logging.getLogger(__name__)
LOG.addHandler(logging.NullHandler())  # a library's log: the application decides where it goes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_CAPABILITY = {"bfloat16": (8, 0)}  # TensorRT's bf16 kernels need Ampere or newer
MIN_VERSION = 10  # strongly typed networks, execute_async_v3, INT64 and BF16 I/O
DEFAULT_MAX_BATCH = 8  # rows of one step: prompts x beams (GLM-130B's default: 1 x 4)
OPT_CONTEXT = 128  # the prompt length the prefill engine is tuned for (capped to the positions)
DEFAULT_ENGINE_CACHE = Path("~/.cache/glmc/engines").expanduser()
ENGINE_FORMAT = 1  # how glmc builds engines; raising it retires every cached engine
INSTALL = ("on a CUDA host, pip install tensorrt-cu12 (or tensorrt-cu13, matching your torch's CUDA) "
           "from NVIDIA's index, --extra-index-url https://pypi.nvidia.com; see the README's TensorRT section")

IN_ENGINE = "in-engine (TensorRT DistCollective, NCCL)"
SEGMENTS = "segments (engines cut at each AllReduce, torch.distributed between them)"
SINGLE = "none (TP 1)"


# ---------------------------------------------------------------------------------------------
# Before anything starts
# ---------------------------------------------------------------------------------------------


def import_tensorrt():
    """The `tensorrt` module, or one line saying what is missing and how to get it."""
    try:
        import tensorrt
    except ModuleNotFoundError as error:
        if error.name != "tensorrt":
            raise GlmcError(f"--backend tensorrt: the tensorrt package is installed but misses {error.name} "
                            f"({INSTALL})") from None
        raise GlmcError(f"--backend tensorrt needs NVIDIA TensorRT: the tensorrt Python package is not "
                        f"installed ({INSTALL})") from None
    except (ImportError, OSError) as error:  # a wheel whose libnvinfer does not load
        raise GlmcError(f"--backend tensorrt: the tensorrt package does not load ({' '.join(str(error).split())[:200]}); "
                        f"{INSTALL}") from None
    version = str(getattr(tensorrt, "__version__", "0"))
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    if major < MIN_VERSION:
        raise GlmcError(f"--backend tensorrt: TensorRT {version} is too old, glmc needs TensorRT {MIN_VERSION} "
                        f"or newer (11 for all-reduce inside the engines): {INSTALL}")
    return tensorrt


def check_capability(dtype: str, capability: tuple[int, int], gpu: str) -> None:
    """Refuse a GPU too old for `dtype`."""
    need = MIN_CAPABILITY.get(dtype)
    if need is not None and tuple(capability) < need:
        raise GlmcError(f"{gpu} has compute capability {capability[0]}.{capability[1]}; TensorRT runs {dtype} "
                        f"from compute capability {need[0]}.{need[1]} (Ampere) on: export the package with "
                        "--dtype float16 for this GPU")


def preflight(device: str, dtype: str | None = None) -> None:
    """Everything `--backend tensorrt` needs, checked before anything is exported or started."""
    import_tensorrt()
    check_device(device)
    if dtype is not None:
        cuda = _cuda_device(device)
        check_capability(dtype, torch.cuda.get_device_capability(cuda), torch.cuda.get_device_name(cuda))


def _cuda_device(device: str) -> torch.device:
    _, index = parse_device(device)
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


# ---------------------------------------------------------------------------------------------
# Optimisation profiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeRange:
    """An input's optimisation profile: the smallest, tuned-for and largest shapes."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for lo, d, hi in zip(self.min, shape, self.max))

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class Limits:
    """What the engines serve: batch rows and positions, and the point they are tuned for."""

    max_batch: int
    positions: int  # the model's max_sequence_length: context plus generation
    opt_batch: int
    opt_context: int  # prefill
    opt_past: int  # decode

    @classmethod
    def of(cls, config: GLMConfig, max_batch_size: int | None = None) -> "Limits":
        batch = DEFAULT_MAX_BATCH if max_batch_size is None else int(max_batch_size)
        if batch < 1:
            raise GlmcError(f"max_batch_size must be at least 1, got {max_batch_size}")
        positions = config.max_sequence_length
        # Tuned for one prompt (the CLI's default batch), a short prompt, and decode halfway.
        return cls(batch, positions, 1, min(positions, OPT_CONTEXT), positions // 2)


def profile_shapes(kind: str, config: GLMConfig, tp_size: int, limits: Limits) -> dict[str, ShapeRange]:
    """min/opt/max of every input of a rank's `step` graph (glmc.graphs.trace).

    tokens, position_ids [batch, new]; attention_mask [batch, 1, new, past + new];
    logit_positions [rows]; past_key_i, past_value_i [batch, heads / tp, past, head_dim].
    One graph serves prefills (an empty past, up to every position new) and decode steps,
    so `new` spans 1..positions and `past` 0..positions - 1 (past + new never exceeds the
    positions); the optimisation point is a decode step halfway through the positions.
    """
    if kind != "step":
        raise ValueError(f"unknown graph kind {kind!r}")
    b, p = limits.max_batch, limits.positions
    ob, op = limits.opt_batch, limits.opt_past
    heads, head_dim = config.num_attention_heads // tp_size, config.head_dim
    ids = ShapeRange((1, 1), (ob, 1), (b, p))
    shapes = {"tokens": ids, "position_ids": ids,
              "attention_mask": ShapeRange((1, 1, 1, 1), (ob, 1, 1, op + 1), (b, 1, p, p)),
              "logit_positions": ShapeRange((1,), (1,), (p,))}
    past = ShapeRange((1, heads, 0, head_dim), (ob, heads, op, head_dim), (b, heads, p - 1, head_dim))
    for i in range(config.num_layers):
        shapes[f"past_key_{i}"] = past
        shapes[f"past_value_{i}"] = past
    return shapes


def _dims(value: onnx.ValueInfoProto) -> list[onnx.TensorShapeProto.Dimension]:
    return list(value.type.tensor_type.shape.dim)


def input_profiles(model: onnx.ModelProto, graph: onnx.ModelProto,
                   graph_profile: dict[str, ShapeRange]) -> dict[str, ShapeRange]:
    """The profile of each input of `model` (a whole graph or a segment of `graph`).

    Graph inputs take `graph_profile`; a segment's other inputs (activations passed
    between segments) take, dimension by dimension, the range of the symbol the graph's
    inputs bind it to (`s43` = batch...), or their fixed size.
    """
    symbols: dict[str, tuple[int, int, int]] = {}
    for value in graph.graph.input:
        shape = graph_profile[value.name]
        for i, dim in enumerate(_dims(value)):
            if dim.dim_param:
                bound = (shape.min[i], shape.opt[i], shape.max[i])
                if symbols.setdefault(dim.dim_param, bound) != bound:
                    raise GlmcError(f"graph inputs bind dimension {dim.dim_param} to two ranges "
                                    f"{symbols[dim.dim_param]} and {bound}")
    initializers = {init.name for init in model.graph.initializer}
    out = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.name in graph_profile:
            out[value.name] = graph_profile[value.name]
            continue
        lo, opt, hi = [], [], []
        for dim in _dims(value):
            if dim.HasField("dim_value"):
                rng = (dim.dim_value,) * 3
            elif dim.dim_param in symbols:
                rng = symbols[dim.dim_param]
            else:
                raise GlmcError(f"segment input '{value.name}' has a dimension "
                                f"'{dim.dim_param or '?'}' no graph input determines")
            lo.append(rng[0]), opt.append(rng[1]), hi.append(rng[2])
        out[value.name] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
    return out


# ---------------------------------------------------------------------------------------------
# AllReduce: wired into the engine, or cut between engines
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectiveWiring:
    """Where one glmc.AllReduce sits: the collective layer replaces it in place."""

    node: str  # the AllReduce node; an Identity of that name stands for it while parsing
    input: str  # the partial sum it reduces (the collective's input)
    output: str  # the sum (what its consumers read; rewired to the collective's output)
    consumers: tuple[tuple[str, int], ...]  # (node, input index) reading `output`
    graph_output: bool  # `output` is also a graph output


def _is_all_reduce(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == ALL_REDUCE


def _marker_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"glmc_all_reduce_{index}"


def all_reduce_plan(model: onnx.ModelProto) -> list[CollectiveWiring]:
    """For each glmc.AllReduce of `model`, in graph order: the tensors that feed and consume its collective."""
    graph = model.graph
    outputs = {v.name for v in graph.output}
    plan = []
    for index, node in enumerate(n for n in graph.node if _is_all_reduce(n)):
        if len(node.input) != 1 or len(node.output) != 1:
            raise GlmcError(f"AllReduce node '{node.name}' must have one input and one output")
        out = node.output[0]
        consumers = tuple((c.name, i) for c in graph.node for i, name in enumerate(c.input) if name == out)
        plan.append(CollectiveWiring(_marker_name(node, index), node.input[0], out, consumers, out in outputs))
    return plan


def _without_glmc_opset(model: onnx.ModelProto) -> None:
    if not any(node.domain == DOMAIN for node in model.graph.node):
        keep = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(keep)


def lower_all_reduces(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose AllReduce markers are Identity nodes of the same name and tensors,
    for TensorRT's parser; `wire_collectives` then puts the collective layers in their place."""
    lowered = copy.deepcopy(model)  # weights are external: the proto is small
    for index, node in enumerate(n for n in lowered.graph.node if _is_all_reduce(n)):
        node.name = _marker_name(node, index)
        node.op_type, node.domain = "Identity", ""
        del node.attribute[:]
    _without_glmc_opset(lowered)
    return lowered


INDEX_INPUTS = ("logit_positions",)  # graph inputs holding a few indices, not activations


def _shape_only_values(model: onnx.ModelProto) -> set[str]:
    """Values computed from the graph inputs' shapes, constants and the index inputs only (the
    exporter's shape arithmetic, the logit positions' reshaping): cheap to recompute in every
    segment that needs them."""
    graph = model.graph
    inputs = {v.name for v in graph.input}
    constant = {init.name for init in graph.initializer}
    found: set[str] = {name for name in INDEX_INPUTS if name in inputs}
    for node in graph.node:  # topologically sorted
        if node.op_type in ("Shape", "Size") and node.domain == "" and node.input and node.input[0] in inputs:
            found.update(node.output)
        elif node.op_type == "Constant" and node.domain == "":
            found.update(node.output)
        elif not _is_all_reduce(node) and node.input and all(
                (not name) or name in found or name in constant for name in node.input):
            if any(name in found for name in node.input):
                found.update(node.output)
    return found


def tensorrt_segments(model: onnx.ModelProto) -> list[Segment]:
    """`graphs.segments.split`, with the shape arithmetic recomputed inside each segment instead of
    passed between them: segments then exchange activations only (TensorRT would have to treat
    a passed shape as a shape-tensor input, with value ranges no profile knows)."""
    segments = split(model)
    if len(segments) == 1:
        return segments
    shape_only = _shape_only_values(model)
    graph_inputs = {v.name for v in model.graph.input}
    producer = {out: node for node in model.graph.node for out in node.output}

    def roots(names) -> set[str]:
        """The graph inputs that the shape arithmetic behind `names` reads."""
        found, stack, seen = set(), list(names), set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in graph_inputs:
                found.add(name)
            elif name in producer:
                stack.extend(n for n in producer[name].input if n)
        return found

    extractor = None
    out = []
    for segment in segments:
        carried = [name for name in segment.inputs if name in shape_only]
        outputs = [name for name in segment.outputs if name not in shape_only]
        if not carried and outputs == segment.outputs:
            out.append(segment)
            continue
        if extractor is None:
            extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
        inputs = sorted((set(segment.inputs) - set(carried)) | roots(carried))
        sub = extractor.extract_model(inputs, outputs)
        sub.opset_import.extend(o for o in model.opset_import if o.domain not in {x.domain for x in sub.opset_import})
        out.append(Segment(sub, inputs, outputs, segment.all_reduces))
    for segment in out:
        _without_glmc_opset(segment.model)
    return out


# ---------------------------------------------------------------------------------------------
# Weights: from the package's own file, nowhere else
# ---------------------------------------------------------------------------------------------


def external_weights(model: onnx.ModelProto, package, rank: int, mmap: np.ndarray | None = None,
                     ) -> list[tuple[str, np.ndarray]]:
    """(name, read-only view) of every external initializer of `model`, from rank `rank`'s weights
    file in `package`. An initializer that is not one of the rank's listed weights, or whose
    reference points anywhere but its place in that file, is refused."""
    entries = package.manifest["ranks"][rank]["tensors"]
    weights_file = Path(package.manifest["ranks"][rank]["weights"]).name
    out = []
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = f"{package.root}: rank {rank} graph initializer '{init.name}'"
        entry = entries.get(init.name)
        if entry is None:
            raise GlmcError(f"{where} is not one of the rank's weights listed in the manifest")
        reference = {item.key: item.value for item in init.external_data}
        try:
            offset, length = int(reference.get("offset", "0")), int(reference.get("length", "-1"))
        except ValueError:
            offset = length = -1
        if reference.get("location") != weights_file or offset != entry["offset"] or length != entry["length"]:
            raise GlmcError(f"{where} points to {reference.get('location')!r} at {reference.get('offset')}, "
                            f"not to its place in {weights_file}")
        array = package.tensor(rank, init.name, mmap)
        count = int(np.prod(init.dims, dtype=np.int64))
        shape = tuple(array.shape)
        if init.data_type == onnx.TensorProto.INT4 and shape:  # packed two per byte, as ONNX stores it
            expected, shape = (count + 1) // 2, shape[:-1] + (shape[-1] * 2,)
        else:
            expected = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize * count
        if shape != tuple(init.dims) or array.nbytes != expected:
            raise GlmcError(f"{where}: shape {list(init.dims)} in the graph, {list(array.shape)} in the manifest")
        out.append((init.name, array))
    return out


# ---------------------------------------------------------------------------------------------
# The engine cache
# ---------------------------------------------------------------------------------------------


def engine_key(*, graph_sha256: str, weights_sha256: str, tensorrt_version: str, gpu_name: str,
               compute_capability: tuple[int, int], dtype: str, profile: dict[str, ShapeRange],
               collectives: str, tp_size: int, rank: int) -> dict:
    """Everything that makes an engine: any change gives another key, hence another build."""
    return {
        "format": ENGINE_FORMAT,
        "graph_sha256": graph_sha256,  # the exact bytes given to the parser (lowering and cut included)
        "weights_sha256": weights_sha256,  # the rank's weights file, as the package's manifest records it
        "tensorrt": tensorrt_version,
        "gpu": gpu_name,
        "compute_capability": list(compute_capability),
        "dtype": dtype,
        "profile": {name: shape.to_dict() for name, shape in sorted(profile.items())},
        "collectives": collectives,
        "tp_size": tp_size,
        "rank": rank,
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class EngineCache:
    """Built engines in a folder: `<digest>.engine` and, beside it, `<digest>.json` recording the
    key it was built for and the engine's size and sha256. An engine is loaded only when its
    record holds exactly the key asked for and the file is the one recorded; anything else
    (stale, foreign, truncated) counts as absent and is rebuilt. Files are written to a
    temporary name and renamed, the record last."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    def paths(self, key: dict) -> tuple[Path, Path]:
        digest = key_digest(key)
        return self.root / f"{digest}.engine", self.root / f"{digest}.json"

    def load(self, key: dict) -> bytes | None:
        engine_path, record_path = self.paths(key)
        if not record_path.is_file() or not engine_path.is_file():
            return None
        try:
            record = read_json(record_path, max_bytes=1 << 20)
        except GlmcError as error:
            LOG.warning("engine cache: %s; rebuilding", error)
            return None
        if not isinstance(record, dict) or record.get("key") != key:
            LOG.warning("engine cache: %s was built for another key; rebuilding", engine_path)
            return None
        facts = record.get("engine") if isinstance(record.get("engine"), dict) else {}
        if engine_path.stat().st_size != facts.get("bytes"):
            LOG.warning("engine cache: %s is not the size recorded; rebuilding", engine_path)
            return None
        data = engine_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != facts.get("sha256"):
            LOG.warning("engine cache: %s differs from its record; rebuilding", engine_path)
            return None
        return data

    def store(self, key: dict, engine: bytes) -> Path:
        engine_path, record_path = self.paths(key)
        self._write(engine_path, engine)
        record = {"key": key, "engine": {"bytes": len(engine), "sha256": hashlib.sha256(engine).hexdigest()},
                  "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_text_atomic(record_path, json.dumps(record, indent=1) + "\n")
        return engine_path

    def timing_cache_path(self, tensorrt_version: str, gpu_name: str, capability: tuple[int, int]) -> Path:
        ident = hashlib.sha256(f"{tensorrt_version}|{gpu_name}|{capability[0]}.{capability[1]}".encode()).hexdigest()
        return self.root / f"timing-{ident[:16]}.cache"

    def load_timing(self, path: Path) -> bytes:
        return path.read_bytes() if path.is_file() else b""

    def store_timing(self, path: Path, data: bytes) -> None:
        self._write(path, data)

    def _write(self, path: Path, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(descriptor, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


# ---------------------------------------------------------------------------------------------
# TensorRT objects (need the tensorrt package and a GPU)
# ---------------------------------------------------------------------------------------------


def _make_logger(trt):
    class Logger(trt.ILogger):
        """TensorRT's messages into Python logging; its errors also kept for the one-line error."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: deque[str] = deque(maxlen=8)

        def log(self, severity, message):
            levels = {trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL,
                      trt.ILogger.Severity.ERROR: logging.ERROR,
                      trt.ILogger.Severity.WARNING: logging.WARNING,
                      trt.ILogger.Severity.INFO: logging.INFO}
            level = levels.get(severity, logging.DEBUG)
            if level >= logging.ERROR:
                self.errors.append(" ".join(str(message).split())[:300])
            if LOG.isEnabledFor(level):
                LOG.log(level, "TensorRT: %s", message)

        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "no reason given"

    return Logger()


def _progress_monitor(trt, report: Callable[[str], None], what: str):
    class Monitor(trt.IProgressMonitor):
        """The build's top-level phases, one line each (a few per build)."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                report(f"{what}: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def _as_void_pointer(address: int):
    """A PyCapsule holding `address`, the form pybind11 takes for a `void*` argument."""
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
    return new(address, None, None)


def _nccl_communicator(comm, device: torch.device) -> int | None:
    """The ncclComm_t of torch.distributed's group behind `comm`, if this torch exposes it."""
    group = getattr(comm, "group", None)
    try:
        if group is None:
            group = torch.distributed.group.WORLD
        backend = group._get_backend(device)
        address = int(backend._comm_ptr())
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return None
    return address or None


@dataclass
class _Runner:
    """One engine and its execution context, with its I/O as the engine names and types them."""

    what: str
    engine: object
    context: object
    inputs: list[str]
    outputs: list[str]
    dtypes: dict[str, torch.dtype]
    profile: dict[str, ShapeRange]
    all_reduces: list[tuple[str, str]]  # after this engine: (partial sum, sum) pairs torch reduces


class TensorRTExecutable:
    """One rank of a `--target tensorrt` package on TensorRT engines; every tensor it returns is on its GPU."""

    def __init__(self, package, mapping: Mapping, spec: RunSpec, comm: Collectives | None = None,
                 progress: Callable[[str], None] | None = None):
        from glmc.graphs.trace import GRAPHS

        trt = import_tensorrt()
        self.trt, self.package, self.mapping = trt, package, mapping
        self.config = package.config
        self.comm = comm if comm is not None else (SingleRank() if mapping.tp_size == 1 else None)
        if self.comm is None:
            raise GlmcError(f"rank {mapping.rank} of a TP-{mapping.tp_size} package needs collectives")
        check_device(spec.device)
        self.device = _cuda_device(spec.device)
        self.gpu_name = torch.cuda.get_device_name(self.device)
        self.capability = tuple(torch.cuda.get_device_capability(self.device))
        check_capability(package.dtype, self.capability, self.gpu_name)
        self.dtype = DTYPES[package.dtype]
        self.limits = Limits.of(self.config, spec.max_batch_size)
        self.cache = EngineCache(spec.cache_path / "engines")
        self.progress = progress or (lambda message: None)
        self.logger = _make_logger(trt)
        self.build_seconds = 0.0  # engine builds of this executable (0 when every engine came from the cache)
        self.run_seconds = 0.0
        rank = mapping.rank
        entry = package.manifest["ranks"][rank]
        self.weights_sha256 = package.manifest["files"][entry["weights"]]["sha256"]
        self._weights = np.memmap(package.weights_path(rank), dtype=np.uint8, mode="r")
        self._placeholder = torch.empty(256, dtype=torch.uint8, device=self.device)  # for empty tensors
        layers = self.config.num_layers
        self._cache_outputs = [f"present_key_{i}" for i in range(layers)] + [f"present_value_{i}" for i in range(layers)]
        self._cache_inputs = [f"past_key_{i}" for i in range(layers)] + [f"past_value_{i}" for i in range(layers)]
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(self.logger)
            self.collectives = self._choose_collectives()
            LOG.info("rank %d: all-reduce %s", rank, self.collectives)
            self.progress(f"rank {rank}: TensorRT {trt.__version__} on {self.gpu_name}, all-reduce {self.collectives}")
            self.graphs = {kind: self._runners(kind) for kind in GRAPHS}
        self.engine_build_seconds = self.build_seconds

    # -- how the ranks sum ----------------------------------------------------------------------

    def _choose_collectives(self) -> str:
        if self.mapping.tp_size == 1:
            return SINGLE
        # NCCL communicators may be created lazily: one all-reduce makes sure the group's exists.
        self.comm.all_reduce(torch.zeros(1, device=self.device))
        has_layer = hasattr(self.trt, "CollectiveOperation") and hasattr(self.trt.INetworkDefinition,
                                                                         "add_dist_collective")
        self._nccl = _nccl_communicator(self.comm, self.device) if has_layer else None
        # Every rank must take the same path: each says whether it can; all must.
        votes = self.comm.all_reduce(torch.tensor([0.0 if self._nccl is None else 1.0], device=self.device))
        return IN_ENGINE if int(votes.item()) == self.mapping.tp_size else SEGMENTS

    def _set_communicator(self, context) -> None:
        try:
            accepted = context.set_communicator(self._nccl)
        except TypeError:  # pybind11 takes a void* as a capsule
            accepted = context.set_communicator(_as_void_pointer(self._nccl))
        if not accepted:
            raise GlmcError(f"rank {self.mapping.rank}: TensorRT refused torch.distributed's NCCL communicator "
                            f"({self.logger.last_error()})")

    # -- engines --------------------------------------------------------------------------------

    def _runners(self, kind: str) -> list[_Runner]:
        rank, tp = self.mapping.rank, self.mapping.tp_size
        path = self.package.graph_path(rank, kind)
        proto = onnx.load(str(path), load_external_data=False)
        graph_profile = profile_shapes(kind, self.config, tp, self.limits)
        if self.collectives == SEGMENTS:
            parts = [(segment.model, [], segment.all_reduces) for segment in tensorrt_segments(proto)]
        elif self.collectives == IN_ENGINE:
            parts = [(lower_all_reduces(proto), all_reduce_plan(proto), [])]
        else:
            parts = [(proto, [], [])]
        runners = []
        for index, (model, plan, reduces) in enumerate(parts):
            what = f"rank {rank} {kind}" + (f" segment {index + 1}/{len(parts)}" if len(parts) > 1 else "")
            profile = input_profiles(model, proto, graph_profile)
            engine = self._engine(what, path, model, plan, profile)
            context = engine.create_execution_context()
            if context is None:
                raise GlmcError(f"{what}: TensorRT could not create an execution context "
                                f"({self.logger.last_error()}); is the GPU's memory full?")
            if plan:
                self._set_communicator(context)
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            mode = self.trt.TensorIOMode.INPUT
            inputs = [n for n in names if engine.get_tensor_mode(n) == mode]
            outputs = [n for n in names if engine.get_tensor_mode(n) != mode]
            dtypes = {n: self._torch_dtype(engine.get_tensor_dtype(n), what, n) for n in names}
            runners.append(_Runner(what, engine, context, inputs, outputs, dtypes, profile, reduces))
        return runners

    def _torch_dtype(self, trt_dtype, what: str, name: str) -> torch.dtype:
        dt = self.trt.DataType
        table = {dt.FLOAT: torch.float32, dt.HALF: torch.float16, dt.BF16: torch.bfloat16, dt.INT64: torch.int64,
                 dt.INT32: torch.int32, dt.BOOL: torch.bool, dt.INT8: torch.int8, dt.UINT8: torch.uint8}
        if trt_dtype not in table:
            raise GlmcError(f"{what}: engine tensor '{name}' has TensorRT type {trt_dtype}, which glmc does not bind")
        return table[trt_dtype]

    def _engine(self, what: str, path: Path, model: onnx.ModelProto, plan: list[CollectiveWiring],
                profile: dict[str, ShapeRange]):
        data = model.SerializeToString()
        key = engine_key(graph_sha256=hashlib.sha256(data).hexdigest(), weights_sha256=self.weights_sha256,
                         tensorrt_version=self.trt.__version__, gpu_name=self.gpu_name,
                         compute_capability=self.capability, dtype=self.package.dtype, profile=profile,
                         collectives=self.collectives, tp_size=self.mapping.tp_size, rank=self.mapping.rank)
        cached = self.cache.load(key)
        if cached is not None:
            engine = self.runtime.deserialize_cuda_engine(cached)
            if engine is not None:
                self.progress(f"{what}: engine from the cache ({self.cache.paths(key)[0]})")
                return engine
            LOG.warning("engine cache: TensorRT could not deserialize %s; rebuilding", self.cache.paths(key)[0])
        serialized = self._build(what, path, model, data, plan, profile)
        try:
            LOG.info("%s: engine stored in %s", what, self.cache.store(key, serialized))
        except OSError as error:  # the run goes on; the next one builds again
            self.progress(f"{what}: the engine cannot be kept in {self.cache.root} ({error.strerror or error})")
        engine = self.runtime.deserialize_cuda_engine(serialized)
        if engine is None:
            raise GlmcError(f"{what}: TensorRT could not load the engine it built ({self.logger.last_error()})")
        return engine

    def _build(self, what: str, path: Path, model: onnx.ModelProto, data: bytes, plan: list[CollectiveWiring],
               profile: dict[str, ShapeRange]) -> bytes:
        trt = self.trt
        self.progress(f"{what}: building a TensorRT engine (once; kept in {self.cache.root})")
        start = time.perf_counter()
        builder = trt.Builder(self.logger)
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        # Strongly typed: each tensor keeps the graph's dtype (TensorRT 11 always is).
        network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
        weights = external_weights(model, self.package, self.mapping.rank, self._weights)
        parser = trt.OnnxParser(network, self.logger)  # holds `weights`' views: both live until the build ends
        if hasattr(parser, "load_model_proto"):
            parsed = parser.load_model_proto(data)
            for name, array in weights:
                parsed = parsed and parser.load_initializer(name, array.ctypes.data, array.nbytes)
            parsed = parsed and parser.parse_model_proto()
        else:
            # An older parser reads the weights itself, relative to the graph's place in the package
            # (external_weights checked that every reference points into the rank's weights file).
            parsed = parser.parse(data, str(path))
        if not parsed:
            errors = [parser.get_error(i) for i in range(parser.num_errors)]
            detail = "; ".join(f"node '{e.node_name()}' ({e.node_operator()}): {e.desc()}" for e in errors[:2])
            raise GlmcError(f"{path}: TensorRT's ONNX parser refused the graph ({what}): "
                            f"{detail or self.logger.last_error()}")
        if plan:
            wire_collectives(trt, network, plan, self.mapping.tp_size, what)
        config = builder.create_builder_config()
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # float32 stays float32, as the reference computes
        optimisation = builder.create_optimization_profile()
        for name in (network.get_input(i).name for i in range(network.num_inputs)):
            if name not in profile:
                raise GlmcError(f"{what}: network input '{name}' has no optimisation profile")
            shape = profile[name]
            optimisation.set_shape(name, shape.min, shape.opt, shape.max)
        config.add_optimization_profile(optimisation)
        timing_path = self.cache.timing_cache_path(trt.__version__, self.gpu_name, self.capability)
        try:
            known = self.cache.load_timing(timing_path)
        except OSError as error:
            LOG.warning("timing cache %s not read: %s", timing_path, error)
            known = b""
        timing = config.create_timing_cache(known)
        if timing is None or not config.set_timing_cache(timing, False):
            LOG.warning("timing cache %s not usable; starting a new one", timing_path)
            config.set_timing_cache(config.create_timing_cache(b""), False)
        if hasattr(trt, "IProgressMonitor"):
            config.progress_monitor = _progress_monitor(trt, self.progress, what)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise GlmcError(f"{what}: TensorRT could not build the engine of {path}: {self.logger.last_error()} "
                            "(TensorRT's full log: Python logger glmc.backends.tensorrt)")
        try:
            self.cache.store_timing(timing_path, bytes(config.get_timing_cache().serialize()))
        except OSError as error:
            LOG.warning("timing cache %s not written: %s", timing_path, error)
        seconds = time.perf_counter() - start
        self.build_seconds += seconds
        self.progress(f"{what}: engine built in {seconds:.1f} s")
        del parser, weights
        return bytes(serialized)

    # -- running --------------------------------------------------------------------------------

    def _address(self, tensor: torch.Tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()

    def _execute(self, runner: _Runner, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        context = runner.context
        for name in runner.inputs:
            tensor = values[name].to(self.device, runner.dtypes[name]).contiguous()
            values[name] = tensor  # kept referenced until the step's work is queued
            shape = tuple(tensor.shape)
            allowed = runner.profile.get(name)
            if (allowed is not None and not allowed.contains(shape)) or not context.set_input_shape(name, shape):
                raise GlmcError(self._outside_profile(runner, name, shape))
            context.set_tensor_address(name, self._address(tensor))
        outputs = {}
        for name in runner.outputs:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise GlmcError(f"{runner.what}: TensorRT could not infer the shape of output '{name}' "
                                f"({self.logger.last_error()})")
            outputs[name] = torch.empty(shape, dtype=runner.dtypes[name], device=self.device)
            context.set_tensor_address(name, self._address(outputs[name]))
        start = time.perf_counter()
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise GlmcError(f"{runner.what}: TensorRT failed to run the engine ({self.logger.last_error()})")
        self.run_seconds += time.perf_counter() - start
        return outputs

    def _outside_profile(self, runner: _Runner, name: str, shape: tuple[int, ...]) -> str:
        allowed = runner.profile.get(name)
        span = f" (the engine takes {list(allowed.min)} to {list(allowed.max)})" if allowed else ""
        return (f"{runner.what}: input '{name}' of shape {list(shape)} is outside the engine's optimisation "
                f"profile{span}: at most {self.limits.max_batch} rows (prompts x beams; RunSpec."
                f"max_batch_size) and {self.limits.positions} positions")

    def _run(self, kind: str, feeds: dict[str, torch.Tensor], cache=None):
        values: dict[str, torch.Tensor] = dict(feeds)
        if cache is not None:
            values.update(zip(self._cache_inputs, cache))
        with torch.cuda.device(self.device):  # TensorRT runs on the current device: this rank's GPU
            for runner in self.graphs[kind]:
                values.update(self._execute(runner, values))
                for source, target in runner.all_reduces:
                    values[target] = self.comm.all_reduce(values[source].clone())
        logits = self.comm.all_gather_last(values["logits"])
        return logits, [values[name] for name in self._cache_outputs]

    def _inputs(self, tokens, position_ids, attention_mask, logit_positions) -> dict[str, torch.Tensor]:
        return {"tokens": tokens.to(self.device, torch.int64),
                "position_ids": position_ids.to(self.device, torch.int64),
                "attention_mask": attention_mask.to(self.device, torch.bool),
                "logit_positions": logit_positions.to(self.device, torch.int64)}

    @torch.no_grad()
    def prefill(self, tokens, position_ids, attention_mask, *, last_only: bool = True, capacity: int | None = None):
        """The step graph over an empty past (`capacity` is a hint the concatenating graph does not need)."""
        heads = self.config.num_attention_heads // self.mapping.tp_size
        empty = torch.zeros(tokens.shape[0], heads, 0, self.config.head_dim, dtype=self.dtype, device=self.device)
        length = tokens.shape[1]
        positions = torch.tensor([length - 1]) if last_only else torch.arange(length)
        return self._run("step", self._inputs(tokens, position_ids, attention_mask, positions),
                         [empty] * len(self._cache_inputs))

    @torch.no_grad()
    def decode(self, tokens, position_ids, attention_mask, cache):
        positions = torch.arange(tokens.shape[1])
        return self._run("step", self._inputs(tokens, position_ids, attention_mask, positions), cache)

    def cache_length(self, cache) -> int:
        return int(cache[0].shape[2])

    @torch.no_grad()
    def reorder_cache(self, cache, index: torch.Tensor):
        rows = index.to(self.device, torch.int64)
        if rows.numel() != cache[0].shape[0]:  # beams fanning out from the prompts: new buffers
            return [t.index_select(0, rows) for t in cache]
        for tensor in cache:  # in place: the buffers (and their addresses) stay
            tensor.copy_(tensor.index_select(0, rows))
        return cache

    @torch.no_grad()
    def join_caches(self, caches: list, capacity: int, skip: list[int] | None = None):
        """One cache holding the rows of `caches` in order, each left-padded to the longest
        (padding is masked out by the caller), the first `skip[i]` positions of cache i left
        out; the concatenating graph needs no room ahead."""
        skip = skip or [0] * len(caches)
        length = max(self.cache_length(c) - s for c, s in zip(caches, skip))
        return [torch.cat([torch.nn.functional.pad(t[:, :, s:], (0, 0, length - t.shape[2] + s, 0))
                           for t, s in zip(parts, skip)])
                for parts in zip(*caches)]

    def cache_tensors(self, cache) -> list[torch.Tensor]:
        return list(cache)


def wire_collectives(trt, network, plan: list[CollectiveWiring], tp_size: int, what: str) -> None:
    """Put a DistCollective ALL_REDUCE (sum over `tp_size` ranks) where each Identity marker of
    `plan` stands: it reduces the marker's input, and every layer that read the marker's output
    reads the collective's output instead."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producers = {}
    for layer in layers:
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer
    for item in plan:
        marker = producers.get(item.output)
        if marker is None or marker.type != trt.LayerType.IDENTITY:
            raise GlmcError(f"{what}: TensorRT's parser made no identity layer of AllReduce '{item.node}' "
                            f"(output '{item.output}') to put the collective in place of")
        layer = network.add_dist_collective(marker.get_input(0), trt.CollectiveOperation.ALL_REDUCE,
                                            trt.ReduceOperation.SUM, -1, None)
        if layer is None:
            raise GlmcError(f"{what}: TensorRT could not add the all-reduce of '{item.node}'")
        layer.num_ranks = tp_size
        layer.name = f"{item.node}/all_reduce"
        reduced = layer.get_output(0)
        rewired = 0
        for consumer in layers:
            if consumer is marker:
                continue
            for j in range(consumer.num_inputs):
                tensor = consumer.get_input(j)
                if tensor is not None and tensor.name == item.output:
                    consumer.set_input(j, reduced)
                    rewired += 1
        if item.graph_output:
            old = marker.get_output(0)
            network.unmark_output(old)
            old.name, reduced.name = f"{item.output}/partial", item.output
            network.mark_output(reduced)
        elif rewired == 0:
            raise GlmcError(f"{what}: nothing reads '{item.output}', the output of AllReduce '{item.node}'")


def compile(source, mapping: Mapping, spec: RunSpec, comm: Collectives | None = None,
            progress: Callable[[str], None] | None = None) -> TensorRTExecutable:
    from glmc.graphs import Package

    if not isinstance(source, Package):
        raise GlmcError("the tensorrt backend runs compiled packages: export one with "
                        "`glmc export CHECKPOINT -o PKG --target tensorrt`")
    if source.target != "tensorrt":
        raise GlmcError(f"{source.root}: exported for target {source.target}; the tensorrt backend runs "
                        "--target tensorrt packages (glmc export ... --target tensorrt)")
    if source.tp_size != mapping.tp_size:
        raise GlmcError(f"{source.root}: exported for TP {source.tp_size}, asked to run at TP {mapping.tp_size}")
    if spec.dtype is not None and spec.dtype != source.dtype:
        raise GlmcError(f"{source.root}: exported in {source.dtype}; --dtype {spec.dtype} needs another export")
    return TensorRTExecutable(source, mapping, spec, comm, progress)
