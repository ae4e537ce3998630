"""How to run a model, as one value: what every rank needs to build its executable.

The CLI (or `glmc.load`, or the server) builds one `RunSpec`; the API hands it to the
runtime, which gives each rank its own variant (`dataclasses.replace`: the rank's
device and thread count) and sends it to the worker processes as JSON; the backends
read it. Nobody spells these options a second time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from glmc.devices import parse_device
from glmc.errors import GlmcError

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RunSpec:
    source: str | None = None  # a SAT checkpoint or a package folder; None: the embedded default model
    config: str | None = None  # preset name for a checkpoint without model_config.json
    backend: str = "torch"  # torch | onnxruntime | tensorrt
    dtype: str | None = None  # compute dtype; None: the source's own (see the backends)
    device: str = "cpu"  # cpu, cuda or cuda:N (a rank's variant names its own GPU)
    tp_size: int = 1  # tensor-parallel degree: one process per rank
    threads: int | None = None  # intra-op threads per rank; None: the machine's cores shared among ranks
    torch_compile: bool = False  # torch backend: run the model through torch.compile
    collective_timeout: float = 20.0  # seconds a rank waits for its peers before the run stops
    max_batch_size: int = 8  # rows a step may hold (sizes the engines of backends that need it)
    cache_dir: str | None = None  # packages exported on the fly (and engines); None: ~/.cache/glmc

    def __post_init__(self) -> None:
        for name, kind in (("source", str), ("config", str), ("dtype", str), ("threads", int), ("cache_dir", str)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise GlmcError(f"run spec: {name} must be a {kind.__name__} or null, got {value!r}")
        if not isinstance(self.backend, str) or not self.backend:
            raise GlmcError(f"run spec: backend must be a name, got {self.backend!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise GlmcError(f"run spec: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.device, str):
            raise GlmcError(f"run spec: device must be a name, got {self.device!r}")
        parse_device(self.device)
        for name in ("tp_size", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 16:
                raise GlmcError(f"run spec: {name} must be an integer in [1, 65536], got {value!r}")
        if self.threads is not None and not 1 <= self.threads <= 1 << 16:
            raise GlmcError(f"run spec: threads must be in [1, 65536], got {self.threads}")
        if not isinstance(self.torch_compile, bool):
            raise GlmcError(f"run spec: torch_compile must be true or false, got {self.torch_compile!r}")
        timeout = self.collective_timeout
        if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(timeout)
                or not 0 < timeout <= 86400):
            raise GlmcError(f"run spec: collective_timeout must be in (0, 86400] seconds, got {timeout!r}")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir if self.cache_dir is not None else "~/.cache/glmc").expanduser()

    @property
    def device_kind(self) -> str:
        return parse_device(self.device)[0]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        values = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - names:
            raise GlmcError(f"run spec: unknown fields {sorted(set(values) - names) if isinstance(values, dict) else values!r}")
        return cls(**values)
