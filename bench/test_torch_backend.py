"""Baseline: the torch backend's decode step and 512-token prefill, against the machine's bounds.

A decode step must read every weight once: its bound is weight bytes / read bandwidth.
A prefill is compute-bound: 2 FLOPs per weight per token (plus attention) / matmul FLOP/s.
"""

from __future__ import annotations

import pytest
import torch

from glmc.config import PRESETS
from glmc.model import GLMModel
from glmc.backends.pytorch import TorchExecutable
from report import Record

PAST = 128
PREFILL = 512


@pytest.fixture(scope="module", params=["glm-tiny", "glm-bench"])
def executable(request):
    config = PRESETS[request.param]
    model = GLMModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return request.param, TorchExecutable(model.eval())


def weight_bytes(executable) -> int:
    return sum(p.numel() * p.element_size() for p in executable.model.parameters())


def test_decode_step(benchmark, executable, machine, record):
    name, ex = executable
    past = min(PAST, ex.config.max_sequence_length - 1)
    tokens = torch.randint(0, 1000, (1, past))
    positions = torch.arange(past)[None]
    causal = ~torch.ones(past, past, dtype=torch.bool).tril()
    _, cache = ex.prefill(tokens, positions, causal[None, None])
    step = (torch.tensor([[7]]), torch.tensor([[past]]), torch.zeros(1, 1, 1, past + 1, dtype=torch.bool))
    benchmark.pedantic(ex.decode, args=(*step, cache), rounds=10 if name == "glm-tiny" else 5, warmup_rounds=1)
    record(Record(f"decode b1 past{past}", name, "torch", benchmark.stats.stats.min, 1,
                  weight_bytes(ex) / machine["bandwidth"], "bandwidth"))


def test_prefill_512(benchmark, executable, machine, record):
    name, ex = executable
    config = ex.config
    length = min(PREFILL, config.max_sequence_length)  # glm-tiny stops at 128
    tokens = torch.randint(0, 1000, (1, length))
    positions = torch.arange(length)[None]
    causal = ~torch.ones(length, length, dtype=torch.bool).tril()
    benchmark.pedantic(ex.prefill, args=(tokens, positions, causal[None, None]), rounds=3, warmup_rounds=1)
    params = sum(p.numel() for p in ex.model.parameters())
    attention = 2 * 2 * config.num_layers * length * length * config.hidden_size  # scores and context
    # Only the last position's logits are computed (generation's prefill): embeddings are not multiplied per token.
    matmul_params = params - config.vocab_size * config.hidden_size
    flops = 2 * matmul_params * length + attention + 2 * config.vocab_size * config.hidden_size
    record(Record(f"prefill {length}", name, "torch", benchmark.stats.stats.min, length,
                  flops / machine["flops"], "compute"))
