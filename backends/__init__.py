"""Backends behind one small protocol, registered by name and imported lazily.

A backend turns a model source (a SAT checkpoint or a compiled package) into an
`Executable` for one tensor-parallel rank: `compile(source, mapping, options) ->
Executable`, whose `prefill`, `decode` and `reorder_cache` are all that generation
needs. An executable owns its device (`.device`, `.dtype`): it takes inputs on any
device and moves them there, and every tensor it returns, logits and KV cache
(`cache_tensors(cache)`), lies there.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from glmc.config import Mapping
from glmc.errors import GlmcError


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


@dataclass(frozen=True)
class CompileOptions:
    dtype: str | None = None  # None: the source's own dtype
    device: str = "cpu"
    threads: int | None = None  # intra-op threads (None: the backend's default)
    torch_compile: bool = False  # torch backend: run the model through torch.compile


def backend_info(name: str) -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        raise GlmcError(f"unknown backend '{name}': choose from {', '.join(BACKENDS)}") from None


def compile(backend: str, source: Any, mapping: Mapping = Mapping(),
            options: CompileOptions = CompileOptions(), comm=None):
    """Build the Executable of `mapping.rank` on the named backend; `comm` (glmc.model.parallel.Collectives)
    connects the ranks when `mapping.tp_size` > 1."""
    info = backend_info(backend)
    if options.device.split(":")[0] not in info.devices:
        raise GlmcError(f"backend '{info.name}' does not run on device '{options.device}' "
                        f"(it runs on {', '.join(info.devices)})")
    if options.dtype is not None and options.dtype not in info.dtypes:
        raise GlmcError(f"backend '{info.name}' does not support dtype '{options.dtype}' "
                        f"(choose from {', '.join(info.dtypes)})")
    return importlib.import_module(info.module).compile(source, mapping, options, comm)
