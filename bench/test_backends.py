"""Decode steps and 512-token prefills on every backend, in interleaved rounds, against the
machine's bounds measured in the same run.

A decode step must read every weight and the KV cache of its rows once: its bound is
(weight bytes + KV bytes) / read bandwidth. A prefill is compute-bound: 2 FLOPs per
weight per token (plus attention) / matmul FLOP/s. Backends: torch (the reference
model, eager), onnxruntime on the fused package (static KV cache written in place),
and onnxruntime on an unfused package (the same graph without the fusions, its cache
concatenated). Decode runs at past 128, 1024 and 2000 to show how a step's cost grows
with the past: only through attention itself.
"""

from __future__ import annotations

import pytest
import torch

from conftest import interleaved, summary
from glmc import backends
from glmc.backends.onnxruntime import OrtCache
from glmc.config import PRESETS
from glmc.model import GLMModel, StaticKVCache
from glmc.run_spec import RunSpec
from report import Record

PREFILL = 512
RUNS = {"torch": None, "onnxruntime": "onnxruntime", "onnxruntime-unfused": "unfused"}
DECODES = {"glm-tiny": [(1, 127), (8, 127)],
           "glm-bench": [(1, 128), (8, 128), (1, 1024), (1, 2000), (8, 2000)]}


@pytest.fixture(scope="module", params=["glm-tiny", "glm-bench"])
def executables(request, sources):
    preset = request.param
    paths = sources(preset)
    made = {name: backends.open_rank(RunSpec(source=str(paths["checkpoint" if kind is None else kind]),
                                             backend="torch" if kind is None else "onnxruntime"))
            for name, kind in RUNS.items()}
    weight_bytes = sum(p.numel() * p.element_size() for p in GLMModel(PRESETS[preset]).parameters())
    return preset, made, weight_bytes


def cache_at(executable, batch: int, past: int):
    """A KV cache of `past` random positions for `batch` rows (a decode step's cost does not depend
    on what the cache holds), and a function that puts it back after a step extended it."""
    config = executable.config
    zeros = torch.zeros(batch, 1, dtype=torch.long)
    _, cache = executable.prefill(zeros, zeros, torch.zeros(batch, 1, 1, 1, dtype=torch.bool), capacity=past + 1)
    if isinstance(cache, StaticKVCache) or (isinstance(cache, OrtCache) and cache.static):
        for tensor in (cache.keys + cache.values) if isinstance(cache, StaticKVCache) else cache.tensors:
            tensor.normal_()
        cache.length = past

        def rewind():
            cache.length = past
    else:  # a concatenated cache: the step's presents replace it
        heads = config.num_attention_heads // executable.mapping.tp_size
        cache.tensors = [torch.randn(batch, heads, past, config.head_dim) for _ in cache.tensors]
        cache.values, cache.length = [executable._to_ort(t) for t in cache.tensors], past
        saved = (list(cache.tensors), list(cache.values))

        def rewind():
            cache.tensors, cache.values = list(saved[0]), list(saved[1])
            cache.length = past
    return cache, rewind


@pytest.mark.parametrize("case", range(5))
def test_decode_step(executables, machine, record, case):
    preset, made, weight_bytes = executables
    if case >= len(DECODES[preset]):
        pytest.skip(f"{preset} has {len(DECODES[preset])} decode cases")
    batch, past = DECODES[preset][case]
    config = PRESETS[preset]
    step = (torch.full((batch, 1), 7), torch.full((batch, 1), past), torch.zeros(batch, 1, 1, past + 1, dtype=torch.bool))
    calls = {}
    for name, ex in made.items():
        cache, rewind = cache_at(ex, batch, past)

        def call(ex=ex, cache=cache, rewind=rewind):
            ex.decode(*step, cache)
            rewind()
        calls[name] = call
    bandwidth = machine.measure_bandwidth()
    times = interleaved(calls, rounds=40 if preset == "glm-tiny" else 12)
    bandwidth = max(bandwidth, machine.measure_bandwidth())
    kv_bytes = 2 * config.num_layers * batch * (past + 1) * config.hidden_size * 4
    for name, seconds in times.items():
        median, low, high = summary(seconds)
        record(Record(f"decode b{batch} past{past}", preset, name, median, batch,
                      (weight_bytes + kv_bytes) / bandwidth, "bandwidth", low=low, high=high))


def _context(batch: int, length: int):
    tokens = torch.randint(0, 1000, (batch, length))
    positions = torch.arange(length).repeat(batch, 1)
    causal = ~torch.ones(length, length, dtype=torch.bool).tril()
    return tokens, positions, causal[None, None].repeat(batch, 1, 1, 1)


def test_prefill_512(executables, machine, record):
    preset, made, _ = executables
    config = PRESETS[preset]
    length = min(PREFILL, config.max_sequence_length)  # glm-tiny stops at 128
    inputs = _context(1, length)
    times = interleaved({name: (lambda ex=ex: ex.prefill(*inputs)) for name, ex in made.items()}, rounds=5)
    params = config.parameter_count()
    attention = 2 * 2 * config.num_layers * length * length * config.hidden_size  # scores and context
    # Only the last position's logits are computed (generation's prefill).
    matmul_params = params - config.vocab_size * config.hidden_size
    flops = 2 * matmul_params * length + attention + 2 * config.vocab_size * config.hidden_size
    for name, seconds in times.items():
        median, low, high = summary(seconds)
        record(Record(f"prefill {length}", preset, name, median, length, flops / machine.flops, "compute",
                      low=low, high=high))
