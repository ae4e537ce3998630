"""Benchmark fixtures: the machine's limits, measured in the same run as the models.

Run:  python -m pytest bench --benchmark-enable
Backends are compared in interleaved rounds inside one test (each round times every
backend once, so the machine's drift hits all alike) and reported as medians with their
spread. Each record carries the hardware bound of its call, measured in this run on
the same number of threads: a decode step against the bytes it must read (weights and
KV cache) over the best read bandwidth seen (a streaming read or a matrix-vector
product, whichever is faster, over a buffer far larger than the last-level cache); a
prefill against its FLOPs over the best matmul throughput seen (torch's and ONNX
Runtime's). A record above 100% of its bound means the bound was measured wrong: the
report says so and the session fails. At the end a table is printed and
bench/results/ receives a JSON file and an SVG plot.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from glmc.api import export
from glmc.checkpoint import model_state, save_checkpoint
from glmc.config import PRESETS
from glmc.model import GLMModel
from report import MemoryRecord, Record, write_report

RECORDS: list[Record] = []
MEMORY: list[MemoryRecord] = []
MACHINE: dict[str, float] = {}
PROBE_BYTES = 1 << 30  # far beyond any last-level cache


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread pools
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return min(out)


class Machine:
    """The machine's limits as this run's libraries reach them, on `threads` threads.

    Virtual machines' memory bandwidth drifts (seen here: 38 to 72 GB/s within minutes),
    so each benchmark measures it again around its own rounds, and a bound is always
    the best value seen: a bound must never be slower than the hardware.
    """

    def __init__(self):
        self.threads = torch.get_num_threads()
        generator = torch.Generator().manual_seed(0)
        self._stream = torch.randn(PROBE_BYTES // 4, generator=generator)
        side = int((PROBE_BYTES // 4) ** 0.5)
        self._matrix = self._stream[: side * side].view(side, side)  # the same bytes, read as a matrix
        self._vector = torch.randn(side, generator=generator)
        self.bandwidth = 0.0
        self.measure_bandwidth(5)
        self.flops = 0.0
        self.measure_flops()

    def measure_bandwidth(self, repeats: int = 3) -> float:
        """Bytes/s: the best of summing the buffer and multiplying it, as a matrix, by a vector
        (what a decode step does)."""
        stream = self._stream.numel() * 4 / best_time(self._stream.sum, repeats)
        gemv = self._matrix.numel() * 4 / best_time(lambda: torch.mv(self._matrix, self._vector), repeats)
        self.bandwidth = max(self.bandwidth, stream, gemv)
        MACHINE.update(bandwidth=self.bandwidth, threads=self.threads)
        return self.bandwidth

    def measure_flops(self) -> float:
        """FLOP/s: the best fp32 matmul of torch and of ONNX Runtime at the shapes of a prefill."""
        for m, k, n in ((512, 1024, 2736), (512, 2736, 1024), (2048, 2048, 2048)):
            a, b = torch.randn(m, k), torch.randn(k, n)
            self.flops = max(self.flops, 2 * m * k * n / best_time(lambda: a @ b, 5),
                             2 * m * k * n / ort_matmul_seconds(a.numpy(), b.numpy()))
        MACHINE.update(flops=self.flops)
        return self.flops


def ort_matmul_seconds(a: np.ndarray, b: np.ndarray) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "probe",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a.shape))],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(b, "b")])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), providers=["CPUExecutionProvider"])
    return best_time(lambda: session.run(None, {"a": a}), 5)


@pytest.fixture(scope="session")
def machine() -> Machine:
    return Machine()


@pytest.fixture(autouse=True)
def restore_threads():
    """torch's thread count is the process's: whatever a benchmark sets, the next starts as the first."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


def interleaved(calls: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Seconds of each call per round, the calls taking turns within every round."""
    for call in calls.values():
        call()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> tuple[float, float, float]:
    """median, and the spread as the 10th and 90th percentiles."""
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return statistics.median(ordered), pick(0.1), pick(0.9)


@pytest.fixture
def record():
    def add(item: Record | MemoryRecord) -> None:
        (MEMORY if isinstance(item, MemoryRecord) else RECORDS).append(item)
    return add


def pytest_sessionfinish(session, exitstatus):
    if RECORDS or MEMORY:
        over = write_report(RECORDS, MACHINE, MEMORY)
        if over and session.exitstatus == 0:
            session.exitstatus = 1  # a bound measured wrong makes every ratio to it meaningless
