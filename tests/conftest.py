from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/oracle.py, tests/tolerances.py

from glmc.checkpoint import model_state, save_checkpoint  # noqa: E402
from glmc.config import PRESETS  # noqa: E402
from glmc.model import GLMModel  # noqa: E402
from glmc.model.init import init_wide_random_  # noqa: E402
from glmc.tokenizer import SpecialTokens  # noqa: E402

DATA = Path(__file__).parent / "data"
SAT_TINY = DATA / "sat_tiny"
SAT_ORACLE = DATA / "sat_oracle"

# Command ids of the tiny test vocabularies (those of the SAT golden data).
TINY_SPECIAL = SpecialTokens.from_base(1000, eos=20)


@pytest.fixture(scope="session")
def tiny_config():
    return PRESETS["glm-tiny"]


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    return init_wide_random_(GLMModel(tiny_config), seed=1).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory):
    """glm-tiny with wide random weights, TP 1, fp32, as a SAT checkpoint."""
    path = tmp_path_factory.mktemp("ckpt") / "glm-tiny"
    save_checkpoint(path, tiny_model.config, [model_state(tiny_model)], iteration="1000",
                    metadata={"special_tokens": TINY_SPECIAL.to_dict()})
    return path


@pytest.fixture(scope="session")
def sat_tiny_cases():
    return json.loads((SAT_TINY / "cases.json").read_text())


def sat_tiny_npz(name: str):
    return np.load(SAT_TINY / f"{name}.npz")


def sat_tiny_weights() -> dict[str, torch.Tensor]:
    state = torch.load(SAT_TINY / "checkpoint/1000/mp_rank_00_model_states.pt", weights_only=True)["module"]
    return {k.removeprefix("transformer."): v for k, v in state.items()}


def record_step_logits(strategy) -> list[torch.Tensor]:
    """Make `strategy` record the logits handed to each step of every generation it starts."""
    seen: list[torch.Tensor] = []
    start = strategy.start

    def recording_start(*args, **kwargs):
        run = start(*args, **kwargs)
        step = run.step
        run.step = lambda logits, tokens: (seen.append(logits.clone()), step(logits, tokens))[1]
        return run

    strategy.start = recording_start
    return seen


def _export(checkpoint, path, **options):
    from glmc.api import export

    return export(checkpoint, path, **options)


@pytest.fixture(scope="session")
def tiny_package(tiny_checkpoint, tmp_path_factory):
    """glm-tiny compiled for ONNX Runtime (fused), TP 1, fp32."""
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("pkg") / "tiny")


@pytest.fixture(scope="session")
def tiny_package_unfused(tiny_checkpoint, tmp_path_factory):
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("pkg") / "tiny-unfused", target="unfused")


@pytest.fixture(scope="session")
def tiny_package_tp2(tiny_checkpoint, tmp_path_factory):
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("pkg") / "tiny-tp2", tp_size=2)


@pytest.fixture(scope="session")
def sat_tiny_package(tmp_path_factory):
    """The SAT golden model compiled for ONNX Runtime."""
    return _export(SAT_TINY / "checkpoint", tmp_path_factory.mktemp("pkg") / "sat-tiny")
