"""`glmc export` packages: layout, manifest, checker, fused counts, TP 2, and refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
import torch

from glmc import backends
from glmc.cli.inspect import graph_summary
from glmc.config import Mapping
from glmc.graphs import Package, PackageError
from glmc.graphs.package import MANIFEST
from glmc.run_spec import RunSpec
from tolerances import assert_close


def test_layout_and_manifest(tiny_package, tiny_checkpoint):
    package = Package.open(tiny_package, verify="full")
    manifest = package.manifest
    assert sorted(p.name for p in (tiny_package / "rank0").iterdir()) == ["step.onnx", "weights.bin"]
    assert manifest["format"] == "glmc-package" and manifest["tp_size"] == 1 and manifest["dtype"] == "float32"
    assert manifest["target"]["name"] == "onnxruntime" and manifest["config"]["num_layers"] == 3
    assert manifest["source"]["iteration"] == "1000" and manifest["special_tokens"]["[MASK]"] == 1000
    assert set(manifest["files"]) == {"rank0/step.onnx", "rank0/weights.bin"}
    assert manifest["format_version"] == 2 and manifest["target"]["static_kv_cache"] is True
    for name, entry in manifest["files"].items():
        assert (tiny_package / name).stat().st_size == entry["bytes"] and len(entry["sha256"]) == 64


def test_weights_are_stored_once_and_shared(tiny_package, tiny_model):
    package = Package.open(tiny_package)
    weights = tiny_package / "rank0" / "weights.bin"
    parameter_bytes = sum(p.numel() * 4 for p in tiny_model.parameters())
    assert parameter_bytes <= weights.stat().st_size < 1.5 * parameter_bytes  # once, plus alignment
    proto = onnx.load(str(package.graph_path(0, "step")), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all({e.key: e.value for e in t.external_data}["location"] == "weights.bin"
                            for t in external)
    state = package.state_dict(0)  # un-transposed, bit-exact
    for name, tensor in tiny_model.state_dict().items():
        if not name.startswith("rotary"):
            assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_graphs_pass_the_full_checker(tiny_checkpoint, tiny_package, tmp_path, dtype):
    from glmc.api import export

    path = tiny_package if dtype == "float32" else export(tiny_checkpoint, tmp_path / "fp16", dtype="float16")
    package = Package.open(path)
    layers = package.config.num_layers
    graph = package.graph_path(0, "step")
    onnx.checker.check_model(str(graph), full_check=True)
    summary = graph_summary(graph)
    assert summary["fused"] == {"Attention": 0, "GroupQueryAttention": layers, "RotaryEmbedding": 2 * layers,
                                "GeGLU": layers, "AllReduce": 0}
    assert summary["softmax"] == {"FLOAT": layers}  # every softmax in FP32, also in the fp16 graph
    assert "Softmax" not in summary["ops"]
    if dtype == "float16":
        proto = onnx.load(str(graph), load_external_data=False)
        logits = next(o for o in proto.graph.output if o.name == "logits")
        assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_the_step_graph_takes_one_token_and_an_empty_past(tiny_package, tiny_model):
    executable = backends.open_rank(RunSpec(source=str(tiny_package), backend="onnxruntime"))
    tokens, positions = torch.tensor([[5]]), torch.tensor([[0]])
    logits, cache = executable.prefill(tokens, positions, torch.zeros(1, 1, 1, 1, dtype=torch.bool), last_only=False)
    with torch.no_grad():
        expected = tiny_model(tokens, positions, torch.zeros(1, 1, 1, 1, dtype=torch.bool)).logits
    assert_close(logits, expected, "float32", "one token, empty past")
    assert [tuple(t.shape) for t in executable.cache_tensors(cache)] == [(1, 8, 1, 8)] * 6


class _ThreadSum:
    """Ranks in threads of one process: the all-reduce and all-gather summed by hand."""

    def __init__(self, size: int):
        self.size, self.barrier, self.slots = size, threading.Barrier(size), {}

    def rank(self, rank: int):
        shared = self

        class Rank:
            def _exchange(self, x, combine):
                shared.slots[rank] = x
                shared.barrier.wait()
                result = combine([shared.slots[r] for r in range(shared.size)])
                shared.barrier.wait()
                return result

            def all_reduce(self, x):
                return self._exchange(x, sum)

            def all_gather_last(self, x):
                return self._exchange(x, lambda parts: torch.cat(parts, -1))

        return Rank()


def test_tp2_graphs_all_reduced_equal_tp1(tiny_package, tiny_package_tp2):
    package = Package.open(tiny_package_tp2)
    layers = package.config.num_layers
    for rank in range(2):
        # One after the embedding lookup, one after each row-parallel matmul.
        assert graph_summary(package.graph_path(rank, "step"))["fused"]["AllReduce"] == 2 * layers + 1
    rng = np.random.default_rng(2)
    tokens = torch.from_numpy(rng.integers(0, 1000, (2, 9)))
    positions = torch.arange(9).repeat(2, 1)
    mask = ~torch.ones(9, 9, dtype=torch.bool).tril()
    mask[:, :5] = False
    mask = mask[None, None].repeat(2, 1, 1, 1)
    reference, _ = backends.open_rank(RunSpec(source=str(tiny_package), backend="onnxruntime")).prefill(
        tokens, positions, mask, last_only=False)
    comm = _ThreadSum(2)
    executables = [backends.open_rank(RunSpec(source=str(tiny_package_tp2), backend="onnxruntime", tp_size=2), Mapping(2, r),
                                     comm=comm.rank(r)) for r in range(2)]
    results = [None, None]

    def run(rank):
        results[rank] = executables[rank].prefill(tokens, positions, mask, last_only=False)[0]

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(2):
        assert_close(results[rank], reference, "float32", f"TP 2 rank {rank} vs TP 1")


# --- refusals -------------------------------------------------------------------------------

def _copy(package, tmp_path):
    return shutil.copytree(package, tmp_path / "copy")


def test_truncated_weights(tiny_package, tmp_path):
    path = _copy(tiny_package, tmp_path)
    weights = path / "rank0" / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PackageError, match=r"weights\.bin: 1000 bytes, the manifest says \d+ \(truncated"):
        Package.open(path)


def test_edited_graph(tiny_package, tmp_path):
    path = _copy(tiny_package, tmp_path)
    graph = path / "rank0" / "step.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"step\.onnx: contents differ from the manifest \(sha256"):
        Package.open(path)


def test_edited_weights_are_caught_by_a_full_check(tiny_package, tmp_path):
    path = _copy(tiny_package, tmp_path)
    weights = path / "rank0" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    Package.open(path)  # sizes match
    with pytest.raises(PackageError, match="sha256 mismatch"):
        Package.open(path, verify="full")


def test_missing_manifest(tiny_package, tmp_path):
    path = _copy(tiny_package, tmp_path)
    (path / MANIFEST).unlink()
    with pytest.raises(PackageError, match="not a glmc package"):
        Package.open(path)
    result = subprocess.run([sys.executable, "-m", "glmc", "inspect", str(path)], capture_output=True, text=True)
    assert result.returncode == 1 and "not a glmc package (no manifest.json" in result.stderr
    result = subprocess.run([sys.executable, "-m", "glmc", "run", "--package", str(path), "--backend", "onnxruntime",
                             "x"], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1


def test_cli_export_and_inspect(tiny_checkpoint, tmp_path):
    out = tmp_path / "pkg"
    result = subprocess.run([sys.executable, "-m", "glmc", "export", str(tiny_checkpoint), "-o", str(out),
                             "--json", "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["passes"]["step"]["fuse_attention"] == 3 and summary["peak_rss_bytes"] > 0
    info = json.loads(subprocess.run([sys.executable, "-m", "glmc", "inspect", str(out), "--json"],
                                     capture_output=True, text=True).stdout)
    assert info["kind"] == "package" and info["ranks"][0]["graphs"]["step"]["fused"]["GroupQueryAttention"] == 3
    again = subprocess.run([sys.executable, "-m", "glmc", "export", str(tiny_checkpoint), "-o", str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_an_interrupted_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import glmc.graphs.package as package_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(package_module, "write_weights", broken)
    from glmc.api import export

    with pytest.raises(OSError, match="disk full"):
        export(tiny_checkpoint, tmp_path / "pkg")
    assert list(tmp_path.iterdir()) == []


EXPORT_PEAK = """
import json, sys
from glmc.api import export
from glmc.checkpoint import SatCheckpoint
from glmc.memory import peak_rss_bytes
import glmc.graphs.trace, onnxscript  # the exporter's own footprint is not the weights'
SatCheckpoint.open(sys.argv[1])
before = peak_rss_bytes()
export(sys.argv[1], sys.argv[2], tp_size=int(sys.argv[3]))
print(json.dumps({"before": before, "peak": peak_rss_bytes()}))
"""


@pytest.fixture(scope="module")
def glm_bench(tmp_path_factory):
    """glm-bench (1.22 GB of fp32 weights) as a checkpoint, and the peak memory of exporting it."""
    from glmc.checkpoint import model_state, save_checkpoint
    from glmc.config import PRESETS
    from glmc.model import GLMModel

    root = tmp_path_factory.mktemp("glm-bench")
    model = GLMModel(PRESETS["glm-bench"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_checkpoint(root / "ckpt", model.config, [model_state(model)])
    rank_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    result = subprocess.run([sys.executable, "-c", EXPORT_PEAK, str(root / "ckpt"), str(root / "pkg"), "1"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return root, rank_bytes, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_export_peak_memory_on_glm_bench_stays_near_one_rank(glm_bench):
    root, rank_bytes, usage = glm_bench
    growth = usage["peak"] - usage["before"]
    print(f"glm-bench rank {rank_bytes / 2**20:.0f} MiB, export peak growth {growth / 2**20:.0f} MiB "
          f"({growth / rank_bytes:.2f} x)")
    # The rank's weights once (read from the memory-mapped checkpoint while writing), plus
    # the tracer's working memory; a second copy of the weights would be 2x.
    assert growth < 1.4 * rank_bytes
    assert Package.open(root / "pkg").manifest["passes"]["step"]["fuse_attention"] == 12


RESIDENT = """
import json, sys, torch
from glmc import backends
from glmc.memory import rss_bytes
from glmc.run_spec import RunSpec
import glmc.backends.onnxruntime, glmc.backends.pytorch, glmc.graphs  # the libraries are not the model
before = rss_bytes()
executable = backends.open_rank(RunSpec(source=sys.argv[1], backend=sys.argv[2]))
tokens = torch.randint(0, 1000, (2, 16))
causal = ~torch.ones(16, 16, dtype=torch.bool).tril()
_, cache = executable.prefill(tokens, torch.arange(16).repeat(2, 1), causal[None, None].repeat(2, 1, 1, 1), capacity=24)
for i in range(8):
    _, cache = executable.decode(tokens[:, i:i + 1], torch.full((2, 1), 16 + i),
                                 torch.zeros(2, 1, 1, 17 + i, dtype=torch.bool), cache)
print(json.dumps({"resident": rss_bytes() - before}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend,source,limit", [("onnxruntime", "pkg", 1.15), ("torch", "ckpt", 1.1),
                                                  ("torch", "pkg", 1.1)])
def test_a_loaded_rank_holds_each_weight_once(glm_bench, backend, source, limit):
    """Resident memory after load, a prefill and decode steps, beyond the libraries: each weight
    once. ONNX Runtime once held glm-bench's weights 4.5 times (every session copied every
    external initializer, prepacking added another copy); the torch backend maps a checkpoint."""
    root, rank_bytes, _ = glm_bench
    result = subprocess.run([sys.executable, "-c", RESIDENT, str(root / source), backend], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    resident = json.loads(result.stdout.strip().splitlines()[-1])["resident"]
    assert resident < limit * rank_bytes, f"{resident / rank_bytes:.2f} x the weights are resident"


@pytest.mark.parametrize("damage", ["truncate-weights", "edit-graph", "drop-manifest"])
def test_damaged_packages_give_one_line(tiny_package, tmp_path, damage):
    path = _copy(tiny_package, tmp_path)
    if damage == "truncate-weights":
        weights = path / "rank0" / "weights.bin"
        weights.write_bytes(weights.read_bytes()[:4096])
    elif damage == "edit-graph":
        graph = path / "rank0" / "step.onnx"
        graph.write_bytes(graph.read_bytes() + b"\0")
    else:
        (path / MANIFEST).unlink()
    result = subprocess.run([sys.executable, "-m", "glmc", "run", "--package", str(path), "--backend", "onnxruntime",
                             "--no-output-files", "x"], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("glmc: error: "), result.stderr
    assert "Traceback" not in result.stderr
