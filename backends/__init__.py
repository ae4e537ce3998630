"""Backends behind one small protocol, registered by name and imported lazily.

A backend turns a model source (a SAT checkpoint or a compiled package) into an
`Executable` for one tensor-parallel rank: each backend module's `compile(source,
mapping, spec, comm) -> Executable`, whose `prefill`, `decode` and `reorder_cache` are
all that generation needs; `open_rank(spec, mapping, comm)` is the one way in. An executable owns its device (`.device`, `.dtype`): it takes inputs on any
device and moves them there, and every tensor it returns, logits and KV cache
(`cache_tensors(cache)`), lies there.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

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


BACKENDS: dict[str, BackendInfo] = {
    "torch": BackendInfo("torch", "glmc.backends.pytorch", ("cpu", "cuda"),
                         ("float32", "float16", "bfloat16"),
                         "the PyTorch reference model, eager; runs checkpoints and packages"),
    "onnxruntime": BackendInfo("onnxruntime", "glmc.backends.onnxruntime", ("cpu", "cuda"),
                               ("float32", "float16"),
                               "ONNX Runtime on a package's graphs (CPU in fp32 and fp16, CUDA)"),
}


def backend_info(name: str) -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        raise GlmcError(f"unknown backend '{name}': choose from {', '.join(BACKENDS)}") from None


def check_spec(spec: RunSpec) -> BackendInfo:
    """Refuse a backend, device or dtype the named backend does not have, before anything starts."""
    info = backend_info(spec.backend)
    if spec.device_kind not in info.devices:
        raise GlmcError(f"backend '{info.name}' does not run on device '{spec.device}' "
                        f"(it runs on {', '.join(info.devices)})")
    if spec.dtype is not None and spec.dtype not in info.dtypes:
        raise GlmcError(f"backend '{info.name}' does not support dtype '{spec.dtype}' "
                        f"(choose from {', '.join(info.dtypes)})")
    return info


def open_rank(spec: RunSpec, mapping: Mapping = Mapping(), comm=None, source: Any = None):
    """The Executable of `mapping.rank` as `spec` says; `comm` (glmc.model.parallel.Collectives)
    connects the ranks when `mapping.tp_size` > 1. `source`: `spec.source` already opened."""
    from glmc.sources import open_source

    info = check_spec(spec)
    if source is None:
        source = open_source(spec.source, spec.config)
    return importlib.import_module(info.module).compile(source, mapping, spec, comm)
