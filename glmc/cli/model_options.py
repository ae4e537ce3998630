"""The options that choose and open a model, shared by the commands that run one."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from glmc.cli.types import finite, threads
from glmc.runtime.launch import torchrun_rank


@dataclass(frozen=True)
class ModelOptions:
    checkpoint: Path | None
    package: Path | None
    config_name: str | None
    tokenizer: Path | None
    tokenizer_variant: str | None
    backend: str
    threads: int | None
    torch_compile: bool
    cache_dir: Path
    tp_size: int
    collective_timeout: float
    dtype: str | None
    device: str

    @property
    def source(self) -> Path | None:
        return self.checkpoint or self.package


_OPTIONS = [
    click.option("--checkpoint", type=click.Path(file_okay=False, path_type=Path),
                 help="SAT checkpoint directory (DIR/latest, DIR/<iter>/mp_rank_XX_model_states.pt). "
                      "Default: the embedded model shipped with glmc.", show_default=False),
    click.option("--package", type=click.Path(file_okay=False, path_type=Path),
                 help="Package written by `glmc export`. With neither, the embedded model runs (exported on "
                      "the fly into --cache-dir for backends that need a package).", show_default=False),
    click.option("--config", "config_name", metavar="NAME",
                 help="Model preset (glm-130b, glm-tiny, glm-demo, glm-bench) for a checkpoint without "
                      "model_config.json. Default: read it, or match the weights against the presets."),
    click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path),
                 help="icetk's ice_text.model. Default: the one named in model_config.json, else "
                      "~/.icetk_models/ice_text.model for GLM-130B. Never downloaded."),
    click.option("--tokenizer-variant", type=click.Choice(["icetk", "sat-0.3"]),
                 help="icetk: what GLM-130B's pinned SAT 0.2.12 runs (whitespace folded). sat-0.3: later "
                      "SAT's tokenizer (tabs, blank runs, bytes kept; different ids).  [default: icetk]"),
    click.option("--backend", default="torch",
                 help="Backend that runs the model: torch, onnxruntime, or tensorrt (a --target tensorrt package "
                      "on an NVIDIA GPU with TensorRT installed; engines built once into --cache-dir/engines)."),
    click.option("--threads", type=threads(), help="Intra-op threads, at most 4 per core. Default: the "
                 "backend's choice.", show_default=False),
    click.option("--torch-compile", is_flag=True,
                 help="torch backend: run the model through torch.compile (slow first steps, faster later)."),
    click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="GLMC_CACHE_DIR",
                 default=Path("~/.cache/glmc").expanduser(),
                 help="Where packages exported on the fly are kept (env GLMC_CACHE_DIR)."),
    click.option("--tp", "tp_size", type=click.IntRange(min=1), default=1,
                 help="Tensor-parallel degree: this process runs rank 0 and starts the other ranks, each "
                      "loading only its share (a package must have been exported for it; a checkpoint is "
                      "resharded on the fly). Under torchrun the degree is torchrun's."),
    click.option("--collective-timeout", type=finite(1, 86400), default=20.0,
                 help="Seconds a rank waits for its peers before the run is stopped."),
    click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
                 help="Compute dtype. Default: the model's own, except that the torch backend computes "
                      "half-precision weights in float32 on CPU.", show_default=False),
    click.option("--device", default="cpu", help="cpu, cuda or cuda:N."),
]
_NAMES = ("checkpoint", "package", "config_name", "tokenizer", "tokenizer_variant", "backend", "threads",
          "torch_compile", "cache_dir", "tp_size", "collective_timeout", "dtype", "device")


def model_options(command):
    """Add the model options to a click command; it receives them as one `model: ModelOptions`."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        options = ModelOptions(**{name: kwargs.pop(name) for name in _NAMES})
        if options.checkpoint and options.package:
            raise click.UsageError("give --checkpoint or --package, not both")
        return command(*args, model=options, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def open_model(options: ModelOptions):
    """The model of these options (a glmc.GLM), or None in a torchrun rank other than 0, which then
    serves rank 0 until it stops."""
    import glmc

    joined = torchrun_rank()
    tp_size = options.tp_size
    if joined is not None:
        rank, tp_size, local_rank = joined
        if rank > 0:
            _serve_torchrun_rank(rank, tp_size, local_rank, options)
            return None
    return glmc.load(options.source, backend=options.backend, dtype=options.dtype, device=options.device,
                     config=options.config_name, tokenizer=options.tokenizer,
                     tokenizer_variant=options.tokenizer_variant, threads=options.threads,
                     torch_compile=options.torch_compile, cache_dir=options.cache_dir, tp_size=tp_size,
                     collective_timeout=options.collective_timeout, on_failure=_abort, spawn=joined is None,
                     progress=_progress(options.backend))


def _progress(backend: str):
    """Progress lines of a long preparation (a TensorRT engine build) on stderr."""
    return lambda message: click.echo(f"[{backend}] {message}", err=True)


def _abort(message: str) -> None:
    """Rank 0 is stuck in a collective with a dead peer: report it and end every rank now."""
    click.echo(f"glmc: error: tensor-parallel run failed: {message}", err=True)
    os._exit(1)


def _serve_torchrun_rank(rank: int, tp_size: int, local_rank: int, options: ModelOptions) -> None:
    from glmc.api import EMBEDDED_DEFAULT, exported_default
    from glmc.backends import backend_info
    from glmc.devices import parse_device
    from glmc.runtime.launch import RankSpec, run_worker

    parse_device(options.device)  # each machine has its own GPUs: only the name is checked here

    source = options.source
    if source is None:  # the embedded model; rank 0 exports it for package backends, the others wait
        source = EMBEDDED_DEFAULT if options.backend == "torch" else exported_default(
            options.cache_dir, options.dtype or "float32", target=backend_info(options.backend).package_target
            or "onnxruntime", tp_size=tp_size, wait_seconds=600)
    spec = RankSpec(source=str(source), backend=options.backend, tp_size=tp_size, dtype=options.dtype,
                    device=options.device, threads=options.threads, torch_compile=options.torch_compile,
                    config=options.config_name, timeout=options.collective_timeout)
    code = run_worker(rank, spec, init_method="env://", local_rank=local_rank)
    if code:
        sys.exit(code)

