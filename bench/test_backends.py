"""Decode steps and 512-token prefills on every backend, against each other and the machine's bounds.

A decode step must read every weight once: its bound is weight bytes / read bandwidth.
A prefill is compute-bound: 2 FLOPs per weight per token (plus attention) / matmul FLOP/s.
Backends: torch (the reference model, eager), onnxruntime on the fused package, and
onnxruntime on an unfused package (the same graphs without the fusion passes).
"""

from __future__ import annotations

import pytest
import torch

from glmc import backends
from glmc.config import PRESETS
from glmc.model import GLMModel
from glmc.run_spec import RunSpec
from report import Record

PAST = 128
PREFILL = 512
RUNS = [("torch", None), ("onnxruntime", "onnxruntime"), ("onnxruntime-unfused", "unfused")]


@pytest.fixture(scope="module", params=[(p, r) for p in ("glm-tiny", "glm-bench") for r in RUNS],
                ids=lambda p: f"{p[0]}-{p[1][0]}")
def executable(request, sources):
    preset, (name, package_kind) = request.param
    paths = sources(preset)
    if package_kind is None:
        ex = backends.open_rank(RunSpec(source=str(paths["checkpoint"]), backend="torch"))
    else:
        ex = backends.open_rank(RunSpec(source=str(paths[package_kind]), backend="onnxruntime"))
    weight_bytes = sum(p.numel() * p.element_size() for p in GLMModel(PRESETS[preset]).parameters())
    return preset, name, ex, weight_bytes


def _context(config, batch: int, length: int):
    tokens = torch.randint(0, 1000, (batch, length))
    positions = torch.arange(length).repeat(batch, 1)
    causal = ~torch.ones(length, length, dtype=torch.bool).tril()
    return tokens, positions, causal[None, None].repeat(batch, 1, 1, 1)


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step(benchmark, executable, machine, record, batch):
    preset, name, ex, weight_bytes = executable
    past = min(PAST, ex.config.max_sequence_length - 1)
    _, cache = ex.prefill(*_context(ex.config, batch, past))
    step = (torch.full((batch, 1), 7), torch.full((batch, 1), past),
            torch.zeros(batch, 1, 1, past + 1, dtype=torch.bool))
    rounds = 30 if preset == "glm-tiny" else 10
    bandwidth = machine.measure_bandwidth()
    benchmark.pedantic(ex.decode, args=(*step, cache), rounds=rounds, warmup_rounds=2)
    bandwidth = max(bandwidth, machine.measure_bandwidth())
    record(Record(f"decode b{batch} past{past}", preset, name, benchmark.stats.stats.min, batch,
                  weight_bytes / bandwidth, "bandwidth"))


def test_prefill_512(benchmark, executable, machine, record):
    preset, name, ex, _ = executable
    config = ex.config
    length = min(PREFILL, config.max_sequence_length)  # glm-tiny stops at 128
    benchmark.pedantic(ex.prefill, args=_context(config, 1, length), rounds=3, warmup_rounds=1)
    params = config.parameter_count()
    attention = 2 * 2 * config.num_layers * length * length * config.hidden_size  # scores and context
    # Only the last position's logits are computed (generation's prefill).
    matmul_params = params - config.vocab_size * config.hidden_size
    flops = 2 * matmul_params * length + attention + 2 * config.vocab_size * config.hidden_size
    record(Record(f"prefill {length}", preset, name, benchmark.stats.stats.min, length,
                  flops / machine.flops, "compute"))
