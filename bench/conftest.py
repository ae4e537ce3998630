"""Benchmark fixtures: the machine's limits, measured in the same run as the models.

Run:  python -m pytest bench --benchmark-enable
Each benchmark records tokens/s and the fraction of the hardware bound it reaches;
at the end a table is printed and bench/results/ receives a JSON file and an SVG plot.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from glmc.api import export
from glmc.checkpoint import model_state, save_checkpoint
from glmc.config import PRESETS
from glmc.model import GLMModel
from report import Record, write_report

RECORDS: list[Record] = []
MACHINE: dict[str, float] = {}


def _timings(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


class Machine:
    """The machine's limits as torch reaches them: read bandwidth (bytes/s), fp32 matmul FLOP/s.

    Virtual machines' memory bandwidth drifts (seen here: 38 to 72 GB/s within minutes),
    so a bandwidth-bound benchmark measures it again right before it runs and the
    bound is the best value seen: a bound must never be slower than the hardware.
    """

    def __init__(self):
        torch.manual_seed(0)
        self._probe = torch.randn(2**28)  # 1 GiB of fp32: far beyond the caches
        self.bandwidth = 0.0
        self.measure_bandwidth(10)
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        self.flops = 2 * 2048**3 / statistics.median(_timings(lambda: a @ b, 10))
        self.threads = torch.get_num_threads()

    def measure_bandwidth(self, repeats: int = 3) -> float:
        best = self._probe.numel() * 4 / min(_timings(self._probe.sum, repeats))
        self.bandwidth = max(self.bandwidth, best)
        MACHINE.update(bandwidth=self.bandwidth, flops=getattr(self, "flops", 0.0))
        return self.bandwidth


@pytest.fixture(scope="session")
def machine() -> Machine:
    return Machine()


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """Per preset: a checkpoint with random weights, and its fused and unfused packages."""
    made = {}

    def get(preset: str):
        if preset not in made:
            root = tmp_path_factory.mktemp(preset)
            model = GLMModel(PRESETS[preset])
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.02)
            save_checkpoint(root / "ckpt", model.config, [model_state(model)])
            del model
            made[preset] = {"checkpoint": root / "ckpt",
                            "onnxruntime": export(root / "ckpt", root / "fused"),
                            "unfused": export(root / "ckpt", root / "unfused", target="unfused")}
        return made[preset]

    return get


@pytest.fixture
def record():
    def add(item: Record) -> None:
        RECORDS.append(item)
    return add


def pytest_sessionfinish(session, exitstatus):
    if RECORDS:
        write_report(RECORDS, MACHINE)
