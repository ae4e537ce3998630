"""Backends behind one small protocol, registered by name and imported lazily.

A backend turns a model source (a SAT checkpoint or a compiled package) into an
`Executable` for one tensor-parallel rank: `compile(source, mapping, options) ->
Executable`, whose `prefill`, `decode` and `reorder_cache` are all that generation
needs. An executable owns its device (`.device`, `.dtype`): it takes inputs on any
device and moves them there, and every tensor it returns, logits and KV cache
(`cache_tensors(cache)`), lies there.

`preflight(backend, device, dtype)` refuses, in one line, what a backend cannot run
here (a device it lacks, a missing package, a GPU too old for the dtype) before
anything is exported or started; a backend module may add its own `preflight`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from glmc.config import Mapping
from glmc.errors import GlmcError


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


@dataclass(frozen=True)
class CompileOptions:
    dtype: str | None = None  # None: the source's own dtype
    device: str = "cpu"
    threads: int | None = None  # intra-op threads (None: the backend's default)
    torch_compile: bool = False  # torch backend: run the model through torch.compile
    max_batch_size: int | None = None  # tensorrt: rows (prompts x beams) the engines serve (None: its default)
    engine_cache: str | None = None  # tensorrt: folder of built engines (None: ~/.cache/glmc/engines)
    # Progress of long steps (a TensorRT engine build), one line each; the CLI prints them.
    progress: Callable[[str], None] | None = field(default=None, compare=False)


def backend_info(name: str) -> BackendInfo:
    try:
        return BACKENDS[name]
    except KeyError:
        raise GlmcError(f"unknown backend '{name}': choose from {', '.join(BACKENDS)}") from None


def preflight(backend: str, device: str, dtype: str | None = None) -> BackendInfo:
    """Refuse, in one line, a backend that cannot run on `device` in `dtype` here; before anything starts."""
    info = backend_info(backend)
    if device.split(":")[0] not in info.devices:
        hint = f": pass --device {info.devices[0]}" if len(info.devices) == 1 else ""
        raise GlmcError(f"backend '{info.name}' does not run on device '{device}' "
                        f"(it runs on {', '.join(info.devices)}){hint}")
    if dtype is not None and dtype not in info.dtypes:
        raise GlmcError(f"backend '{info.name}' does not support dtype '{dtype}' "
                        f"(choose from {', '.join(info.dtypes)})")
    check = getattr(importlib.import_module(info.module), "preflight", None)
    if check is not None:
        check(device, dtype)
    return info


def compile(backend: str, source: Any, mapping: Mapping = Mapping(),
            options: CompileOptions = CompileOptions(), comm=None):
    """Build the Executable of `mapping.rank` on the named backend; `comm` (glmc.model.parallel.Collectives)
    connects the ranks when `mapping.tp_size` > 1."""
    info = preflight(backend, options.device, options.dtype)
    return importlib.import_module(info.module).compile(source, mapping, options, comm)
