"""Per-token time at TP 1, 2, 4 and 8 on CPU (informative on 2 cores), and where it goes.

Each run's ranks are real processes joined by gloo. Rank 0 reports the share of a
decode step spent in collectives and, for ONNX Runtime, between the segments that
its rank graph is cut into at the AllReduce nodes (binding and host copies).
"""

from __future__ import annotations

import time

import pytest
import torch

import glmc
from glmc.api import export
from glmc.config import PRESETS
from glmc.model import GLMModel
from report import Record

PAST = 64
DEGREES = (1, 2, 4, 8)


@pytest.fixture(scope="session")
def tp_packages(sources, tmp_path_factory):
    made = {}

    def get(preset: str, tp: int):
        if (preset, tp) not in made:
            checkpoint = sources(preset)["checkpoint"]
            made[(preset, tp)] = (sources(preset)["onnxruntime"] if tp == 1 else
                                  export(checkpoint, tmp_path_factory.mktemp(f"{preset}-tp{tp}") / "pkg", tp_size=tp))
        return made[(preset, tp)]

    return get


@pytest.mark.parametrize("tp", DEGREES)
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("preset", ["glm-tiny", "glm-bench"])
def test_decode_step_by_tp(benchmark, tp_packages, machine, record, preset, backend, tp):
    model = glmc.load(tp_packages(preset, tp), backend=backend, tp_size=tp, collective_timeout=600)
    try:
        executable = model.executable
        local = executable.local if tp > 1 else executable
        comm = model.cluster.comm if tp > 1 else None
        tokens = torch.randint(0, 1000, (1, PAST))
        causal = ~torch.ones(PAST, PAST, dtype=torch.bool).tril()
        _, cache = executable.prefill(tokens, torch.arange(PAST)[None], causal[None, None], capacity=PAST + 64)

        def decode():  # the cache grows by one position a step (by at most 30 here)
            past = executable.cache_length(cache)
            executable.decode(torch.tensor([[7]]), torch.tensor([[past]]),
                              torch.zeros(1, 1, 1, past + 1, dtype=torch.bool), cache)

        rounds = 20 if preset == "glm-tiny" else 5
        benchmark.pedantic(decode, rounds=2, warmup_rounds=1)  # warm-up for the counters below
        comm_before = comm.seconds if comm else 0.0
        run_before = getattr(local, "run_seconds", 0.0)
        start = time.perf_counter()
        for _ in range(rounds):
            decode()
        seconds = (time.perf_counter() - start) / rounds
        collectives = ((comm.seconds - comm_before) / rounds) if comm else 0.0
        split = None
        if backend == "onnxruntime" and tp > 1:
            split = seconds - (local.run_seconds - run_before) / rounds - collectives
        weight_bytes = sum(p.numel() * 4 for p in GLMModel(PRESETS[preset]).parameters())
        record(Record(f"decode b1 past{PAST}", preset, backend, seconds, 1, weight_bytes / machine.bandwidth,
                      "bandwidth", tp=tp, collective_seconds=collectives, split_seconds=split))
    finally:
        model.close()
