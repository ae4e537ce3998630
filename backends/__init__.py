"""Backends behind one small protocol, registered by name and imported lazily.

A backend turns a model source (a SAT checkpoint or a compiled package) into an
`Executable` for one tensor-parallel rank: each backend module's `compile(source,
mapping, spec, comm, progress) -> Executable`, whose `prefill`, `decode` and
`reorder_cache` are all that generation needs; `open_rank(spec, mapping, comm)` is the
one way in. An executable owns its device (`.device`, `.dtype`): it takes inputs on any
device and moves them there, and every tensor it returns, logits and KV cache
(`cache_tensors(cache)`), lies there.

`check_spec(spec)` refuses, in one line, what a backend cannot run here (a device it
lacks, a missing package, a GPU too old for the dtype) before anything is exported or
started; a backend module may add its own `preflight(device, dtype)`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from glmc.config import Mapping
from glmc.errors import GlmcError
from glmc.run_spec import RunSpec


@dataclass(frozen=True)
class BackendInfo:
    name: str
    module: str  # imported on first use
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    description: str
    package_target: str | None = None  # the export target of the packages it runs (None: checkpoints too)


BACKENDS: dict[str, BackendInfo] = {
    "torch": BackendInfo("torch", "glmc.backends.pytorch", ("cpu", "cuda"),
                         ("float32", "float16", "bfloat16"),
                         "the PyTorch reference model, eager; runs checkpoints and packages"),
    "onnxruntime": BackendInfo("onnxruntime", "glmc.backends.onnxruntime", ("cpu", "cuda"),
                               ("float32", "float16"),
                               "ONNX Runtime on a package's graphs (CPU in fp32 and fp16, CUDA)", "onnxruntime"),
    "tensorrt": BackendInfo("tensorrt", "glmc.backends.tensorrt", ("cuda",), ("float32", "float16", "bfloat16"),
                            "TensorRT engines built from a --target tensorrt package's graphs (NVIDIA GPUs)",
                            "tensorrt"),
}


def backend_info(name: str) -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        raise GlmcError(f"unknown backend '{name}': choose from {', '.join(BACKENDS)}") from None


def check_spec(spec: RunSpec) -> BackendInfo:
    """Refuse, in one line, what the named backend cannot run here (a device it lacks, a dtype, a
    missing package, a GPU too old for the dtype), before anything is exported or started."""
    info = backend_info(spec.backend)
    if spec.device_kind not in info.devices:
        hint = f": pass --device {info.devices[0]}" if len(info.devices) == 1 else ""
        raise GlmcError(f"backend '{info.name}' does not run on device '{spec.device}' "
                        f"(it runs on {', '.join(info.devices)}){hint}")
    if spec.dtype is not None and spec.dtype not in info.dtypes:
        raise GlmcError(f"backend '{info.name}' does not support dtype '{spec.dtype}' "
                        f"(choose from {', '.join(info.dtypes)})")
    check = getattr(importlib.import_module(info.module), "preflight", None)
    if check is not None:
        check(spec.device, spec.dtype)
    return info


def open_rank(spec: RunSpec, mapping: Mapping = Mapping(), comm=None, source: Any = None,
              progress: Callable[[str], None] | None = None):
    """The Executable of `mapping.rank` as `spec` says; `comm` (glmc.model.parallel.Collectives)
    connects the ranks when `mapping.tp_size` > 1. `source`: `spec.source` already opened.
    `progress` receives one line per step of a long preparation (a TensorRT engine build)."""
    from glmc.sources import open_source

    info = check_spec(spec)
    if source is None:
        source = open_source(spec.source, spec.config)
    return importlib.import_module(info.module).compile(source, mapping, spec, comm, progress)
