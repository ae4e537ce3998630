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


@pytest.fixture(scope="session")
def machine() -> dict[str, float]:
    """Read bandwidth (bytes/s) and fp32 matmul throughput (FLOP/s) of this machine, as torch sees them.

    Medians of ten runs: one lucky or unlucky run must not move every ratio of the report.
    """
    torch.manual_seed(0)
    big = torch.randn(2**28)  # 1 GiB of fp32: far beyond the caches
    bandwidth = big.numel() * 4 / statistics.median(_timings(big.sum, 10))
    big = None  # free it before the matmul measurement
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flops = 2 * 2048**3 / statistics.median(_timings(lambda: a @ b, 10))
    limits = {"bandwidth": bandwidth, "flops": flops, "threads": torch.get_num_threads()}
    MACHINE.update(limits)
    return limits


@pytest.fixture
def record():
    def add(item: Record) -> None:
        RECORDS.append(item)
    return add


def pytest_sessionfinish(session, exitstatus):
    if RECORDS:
        write_report(RECORDS, MACHINE)
