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


def run_ort(model, feeds):
    """Run a graph (an onnx_ir model); one whose cache is static (GroupQueryAttention) gets buffers
    holding the past with room for the new tokens, bound as both past and present, and returns what
    they hold after."""
    import onnx_ir as ir
    import onnxruntime as ort

    from glmc.passes import static_kv_cache

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    static = any(static_kv_cache.is_static_attention(n) for n in model.graph)
    if not static:
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, feeds)))
    total = feeds["attention_mask"].shape[-1]
    binding = session.io_binding()
    binding.bind_output("logits", "cpu")
    buffers = {}
    for name, value in feeds.items():
        if name.startswith("past_"):
            buffer = np.zeros(value.shape[:2] + (total,) + value.shape[3:], value.dtype)
            buffer[:, :, :value.shape[2]] = value
            buffers[name.replace("past_", "present_")] = buffer
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buffer))
        else:
            binding.bind_cpu_input(name, value)
    for name, buffer in buffers.items():
        binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buffer))
    session.run_with_iobinding(binding)
    return {"logits": binding.get_outputs()[0].numpy(), **buffers}
