"""Weight-only int8 / int4 against fp32: glm-bench decode (batch 1 and 8) and prefill, ONNX Runtime and torch.

Each (backend, weights) pair runs in a process of its own that holds only that model, so
that its resident memory (RSS) is the model's; the parent measures the read bandwidth
right before and after each one. A decode step's bound is the bytes of that model's own
weights (what the step must read) over the bandwidth; a prefill's, as in test_backends,
its FLOPs over the fp32 matmul throughput. At the end a table gives every run's time,
fraction of its bound, speed-up over fp32 in the same run, and RSS, and a JSON file
lands in bench/results/.

    python -m pytest bench/test_quantization.py --benchmark-enable

What stays float in a quantized glm-bench (GLM-130B's scheme): the word embedding, which
is also the tied output projection (150,528 x 1,024: half of glm-bench's weights, 1.4% of
GLM-130B's), the LayerNorms and the biases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

PRESET = "glm-bench"
PAST = 128
PREFILL = 512
VARIANTS = {"fp32": None, "int8": 8, "int4": 4}
# (backend, weights, compute dtype): fp32 activations everywhere, and the torch backend in bfloat16 too,
# where PyTorch's weight-only CPU kernels run (in float32 it dequantizes block by block, see
# glmc.model.quantized).
MATRIX = [(backend, variant, "float32") for backend in ("onnxruntime", "torch") for variant in VARIANTS] + [
    ("torch", "int8", "bfloat16"), ("torch", "int4", "bfloat16")]
RESULTS = Path(__file__).parent / "results"
RUNS: list[dict] = []


@pytest.fixture(scope="module")
def packages(sources, tmp_path_factory):
    """glm-bench's fp32 package (the other benchmarks') and its int8 and int4 exports."""
    from glmc.api import export

    made = {"fp32": sources(PRESET)["onnxruntime"]}
    root = tmp_path_factory.mktemp("quantized")
    for name, bits in VARIANTS.items():
        if bits is not None:
            made[name] = export(sources(PRESET)["checkpoint"], root / name, quantization_bits=bits)
    return made


def _worker(package: str, backend: str, dtype: str) -> dict:
    """In a fresh process: load the package on `backend`, time decode and prefill, report RSS."""
    result = subprocess.run([sys.executable, __file__, package, backend, dtype], capture_output=True, text=True,
                            timeout=1800, cwd=Path(__file__).parent)
    if result.returncode:
        raise AssertionError(f"{backend} on {package} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend,variant,dtype", MATRIX, ids=[f"{b}-{v}-{d}" for b, v, d in MATRIX])
def test_quantized_run(benchmark, packages, machine, record, backend, variant, dtype):
    from glmc.graphs import Package
    from report import Record

    bandwidth = machine.measure_bandwidth()
    timings = benchmark.pedantic(_worker, args=(str(packages[variant]), backend, dtype), rounds=1, iterations=1)
    bandwidth = max(bandwidth, machine.measure_bandwidth())
    package = Package.open(packages[variant])
    weight_bytes = timings["weight_bytes"]
    name = f"{backend}-{variant}" + ("" if dtype == "float32" else f"-{dtype}")
    for batch in (1, 8):
        record(Record(f"decode b{batch} past{PAST}", PRESET, name, timings[f"decode_b{batch}"], batch,
                      weight_bytes / bandwidth, "bandwidth"))
    config = package.config
    params = config.parameter_count()
    attention = 2 * 2 * config.num_layers * PREFILL * PREFILL * config.hidden_size
    flops = 2 * (params - config.vocab_size * config.hidden_size) * PREFILL + attention \
        + 2 * config.vocab_size * config.hidden_size
    record(Record(f"prefill {PREFILL}", PRESET, name, timings["prefill"], PREFILL, flops / machine.flops, "compute"))
    RUNS.append(dict(timings, backend=backend, variant=variant, dtype=dtype, bandwidth=bandwidth,
                     file_bytes=package.weights_path(0).stat().st_size))


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """After the module: one table of the quantized runs against fp32 in the same run."""
    yield
    if not RUNS:
        return
    lines = [f"{'backend':<12}{'weights':<14}{'decode b1':>11}{'of bound':>10}{'vs fp32':>9}{'decode b8':>11}"
             f"{'vs fp32':>9}{'prefill':>9}{'vs fp32':>9}{'RSS MiB':>9}{'vs fp32':>9}{'file MiB':>10}"]
    for run in RUNS:
        base = next((r for r in RUNS if r["backend"] == run["backend"] and r["variant"] == "fp32"), None)
        label = run["variant"] + ("" if run["dtype"] == "float32" else " (bf16)")

        def speedup(key: str) -> str:
            return f"{base[key] / run[key]:>8.2f}x" if base else f"{'-':>9}"

        bound = run["weight_bytes"] / run["bandwidth"]
        rss = f"{run['rss'] / base['rss']:>8.2f}x" if base else f"{'-':>9}"
        lines.append(f"{run['backend']:<12}{label:<14}{run['decode_b1'] * 1e3:>9.1f}ms{bound / run['decode_b1']:>10.0%}"
                     f"{speedup('decode_b1')}{run['decode_b8'] * 1e3:>9.1f}ms{speedup('decode_b8')}"
                     f"{run['prefill']:>8.2f}s{speedup('prefill')}{run['rss'] / 2**20:>9.0f}{rss}"
                     f"{run['file_bytes'] / 2**20:>10.0f}")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    reporter.write_line("\nweight-only quantization, glm-bench (bound: the run's own weight bytes / read bandwidth):")
    for line in lines:
        reporter.write_line(line)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"quantization-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"runs": RUNS, "table": lines}, indent=2))
    reporter.write_line(f"results: {path}")


def _run(package: str, backend: str, dtype: str) -> dict:
    """The worker's body (see `_worker`)."""
    import time

    import torch

    from glmc import backends
    from glmc.memory import rss_bytes
    from glmc.run_spec import RunSpec

    executable = backends.open_rank(RunSpec(source=package, backend=backend, dtype=dtype))
    if backend == "torch":
        model = executable.model
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    else:  # each parameter once: the tied embedding's second form (rows for the lookup) is not read whole
        rank = executable.package.manifest["ranks"][0]
        weight_bytes = sum(rank["tensors"][entry["initializer"]]["length"] for entry in rank["parameters"].values())

    def context(batch: int, length: int):
        tokens = torch.randint(0, 1000, (batch, length))
        positions = torch.arange(length).repeat(batch, 1)
        causal = ~torch.ones(length, length, dtype=torch.bool).tril()
        return tokens, positions, causal[None, None].repeat(batch, 1, 1, 1)

    def best(fn, rounds: int) -> float:
        fn()  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    out = {"weight_bytes": weight_bytes}
    for batch in (1, 8):
        _, cache = executable.prefill(*context(batch, PAST), capacity=PAST + 16)
        held = [cache]

        def step():  # one token more each time (caches are extended in place): past 128 to 139
            past = executable.cache_length(held[0])
            _, held[0] = executable.decode(torch.full((batch, 1), 7), torch.full((batch, 1), past),
                                           torch.zeros(batch, 1, 1, past + 1, dtype=torch.bool), held[0])

        out[f"decode_b{batch}"] = best(step, 10)
        del cache, held
    out["prefill"] = best(lambda: executable.prefill(*context(1, PREFILL)), 3)
    out["rss"] = rss_bytes()  # the model and one step's working memory
    with open("/proc/self/status", encoding="ascii") as status:  # file-backed pages: the mapped weights
        fields = dict(line.split(":", 1) for line in status if line.startswith(("RssAnon", "RssFile", "VmHWM")))
    out.update({key.lower(): int(value.split()[0]) * 1024 for key, value in fields.items()})
    return out


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    print(json.dumps(_run(sys.argv[1], sys.argv[2], sys.argv[3])))
