"""The options that choose and open a model, shared by the commands that run one."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import click

from glmc.cli.types import finite, threads
from glmc.errors import GlmcError
from glmc.run_spec import RunSpec


@dataclass(frozen=True)
class ModelOptions:
    """What the model options say: the run (every rank's part) and rank 0's own tokenizer."""

    spec: RunSpec
    tokenizer: Path | None
    tokenizer_variant: str | None

    @property
    def source(self) -> str | None:
        return self.spec.source

    @property
    def backend(self) -> str:
        return self.spec.backend

    @property
    def tp_size(self) -> int:
        return self.spec.tp_size


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
        values = {name: kwargs.pop(name) for name in _NAMES}
        if values["checkpoint"] and values["package"]:
            raise click.UsageError("give --checkpoint or --package, not both")
        source = values["checkpoint"] or values["package"]
        try:
            spec = RunSpec(source=None if source is None else str(source), config=values["config_name"],
                           backend=values["backend"], dtype=values["dtype"], device=values["device"],
                           tp_size=values["tp_size"], threads=values["threads"],
                           torch_compile=values["torch_compile"], collective_timeout=values["collective_timeout"],
                           cache_dir=str(values["cache_dir"]))
        except GlmcError as error:
            raise click.UsageError(str(error).removeprefix("run spec: ")) from None
        options = ModelOptions(spec, values["tokenizer"], values["tokenizer_variant"])
        return command(*args, model=options, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def open_model(options: ModelOptions):
    """The model of these options (a glmc.GLM), or None in a torchrun rank other than 0, which then
    serves rank 0 until it stops."""
    from glmc.api import open_model as open_glm
    from glmc.runtime.launch import torchrun_rank

    spec, rendezvous = options.spec, None
    joined = torchrun_rank()
    if joined is not None:
        rank, tp_size, local_rank, rendezvous = joined
        spec = replace(spec, tp_size=tp_size)
        if rank > 0:
            _serve_torchrun_rank(rank, local_rank, rendezvous, spec)
            return None
    return open_glm(spec, tokenizer=options.tokenizer, tokenizer_variant=options.tokenizer_variant,
                    on_failure=_abort, spawn=joined is None, rendezvous=rendezvous, progress=_progress(spec.backend))


def _progress(backend: str):
    """Progress lines of a long preparation (a TensorRT engine build) on stderr."""
    return lambda message: click.echo(f"[{backend}] {message}", err=True)


def _abort(message: str) -> None:
    """Rank 0 is stuck in a collective with a dead peer: report it and end every rank now."""
    click.echo(f"glmc: error: tensor-parallel run failed: {message}", err=True)
    os._exit(1)


def _serve_torchrun_rank(rank: int, local_rank: int, rendezvous, spec: RunSpec) -> None:
    from glmc.api import exported_default
    from glmc.backends import backend_info
    from glmc.runtime.launch import run_worker
    from glmc.sources import EMBEDDED_DEFAULT

    if spec.source is None:  # the embedded model; rank 0 exports it for package backends, the others wait
        target = backend_info(spec.backend).package_target or "onnxruntime"
        source = EMBEDDED_DEFAULT if spec.backend == "torch" else exported_default(
            spec.cache_path, spec.dtype or "float32", target=target, tp_size=spec.tp_size, wait_seconds=600)
        spec = replace(spec, source=str(source))
    code = run_worker(rank, spec, rendezvous, local_rank=local_rank, spawned=False)
    if code:
        sys.exit(code)
