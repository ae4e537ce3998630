"""tools/gpu_check.py in its dry mode on the CPU: every part runs (or says why not) and the
report holds what the GPU run will be judged by."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "gpu_check.py"
PARTS = ["torch_parity", "bench_decode", "bench_prefill", "glm130b_rank", "onnxruntime_cuda", "tensorrt"]


def _strict_json(text: str) -> dict:
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run from a folder outside the repository, importing glmc through the script's own
    bootstrap (as on a machine where glmc is not installed)."""
    cwd = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, GLMC_GPU_CHECK_FORCE_BOOTSTRAP="1")
    # One torch thread: on a 2-core machine where another process holds a core, torch's two
    # OpenMP threads wait on each other at every op (this run measured 38 s instead of 8 s).
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--threads", "1",
                             "--report", "out/report.json"],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    report_path = cwd / "out" / "report.json"
    report = _strict_json(report_path.read_text()) if report_path.is_file() else None
    return result, report, cwd


def test_exits_0_and_writes_every_part(dry_run):
    result, report, cwd = dry_run
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert report is not None
    assert list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped", "failed"), name
        assert part["seconds"] >= 0
        assert part["status"] == "ok" or part["reason"], name
    assert report["dry"] is True and report["device"] == "cpu" and report["threads"] == 1
    for name in PARTS:  # the human table
        assert name in result.stdout
    assert not list((cwd / "out").glob(".report.json.*")), "temporary report file left behind"


def test_bootstrap_imported_the_repository(dry_run):
    _, report, _ = dry_run
    bootstrap = report["bootstrap"]
    assert bootstrap["mode"] == "repository"
    folders = {"glmc": "glmc", "glmc.backends": "backends", "glmc.graphs": "graphs", "glmc.passes": "passes"}
    for module, folder in folders.items():
        assert Path(bootstrap["modules"][module]).resolve() == REPO / folder / "__init__.py"


def test_torch_parity_in_both_half_dtypes(dry_run):
    _, report, _ = dry_run
    part = report["parts"]["torch_parity"]
    assert part["status"] == "ok", part["reason"]
    for dtype in ("float16", "bfloat16"):
        measured = part["measurements"][dtype]
        assert measured["logits_device"] == "cpu"
        assert 0 < measured["max_relative_logit_error"] <= measured["limit"]
        assert set(measured["relative_logit_errors"]) == {"causal_prefill", "gmask_prefill", "cached_decode"}
        assert isinstance(measured["greedy_identical"], bool) and isinstance(measured["beam_identical"], bool)
        assert measured["greedy_reference_min_margin"] > 0


def test_bench_parts_within_their_bounds(dry_run):
    _, report, _ = dry_run
    assert report["machine"]["status"] == "ok"
    assert report["machine"]["bandwidth_bytes_per_s"] > 0 and report["machine"]["matmul_flops_per_s"] > 0
    decode = report["parts"]["bench_decode"]
    assert decode["status"] == "ok", decode["reason"]
    assert [(c["batch"], c["past"]) for c in decode["measurements"]["cases"]] == [(1, 128), (8, 128)]
    prefill = report["parts"]["bench_prefill"]
    assert prefill["status"] == "ok", prefill["reason"]
    for result in decode["measurements"]["cases"] + [prefill["measurements"]]:
        assert 0 < result["fraction_of_bound"] <= result["best_fraction_of_bound"] <= 1.0
        assert result["tokens_per_s"] > 0 and math.isfinite(result["median_ms"])


def test_glm130b_rank_shaped_run(dry_run):
    _, report, _ = dry_run
    part = report["parts"]["glm130b_rank"]
    assert part["status"] == "ok", part["reason"]
    measured = part["measurements"]
    assert measured["tp_size"] == 8 and measured["rank"] == 0
    # The dry rank's vocabulary is 8192: rank 0 of 8 holds 1024 rows (GLM-130B: 150528 / 8).
    assert measured["logits_shape"] == [1, 1, 8192 // 8]
    assert [c["past"] for c in measured["cases"]] == [128, 2047]
    for case in measured["cases"]:
        assert 0 < case["fraction_of_bound"] <= 1.0


def test_gpu_backends_skipped_with_what_is_missing(dry_run):
    _, report, _ = dry_run
    ort = report["parts"]["onnxruntime_cuda"]
    assert ort["status"] == "skipped"
    assert "CUDAExecutionProvider" in ort["reason"] or "onnxruntime is not installed" in ort["reason"]
    trt = report["parts"]["tensorrt"]
    assert trt["status"] == "skipped"
    assert trt["reason"] in ("tensorrt is not installed", "glmc has no tensorrt backend yet") \
        or trt["reason"].startswith("--device cpu")


def test_wrapper_runs_from_another_folder(tmp_path):
    result = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--help"], cwd=tmp_path,
                            env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--report" in result.stdout


# The comparison itself, in-process on made-up outputs: it must fail what it should.


def _script():
    """tools/gpu_check.py as a module (importing it runs nothing; glmc is not needed for this)."""
    import importlib.util

    name = "gpu_check_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their annotations through it
        spec.loader.exec_module(module)
    return sys.modules[name]


def _outputs(module, *, shift=0.0, picks=(5, 7), beams_at_step_1=(1, 2), device="cpu"):
    import torch

    generator = torch.Generator().manual_seed(0)
    prefill = {kind: 10 * torch.randn(2, 20, 50, generator=generator) for kind in ("causal", "gmask")}
    decode = 10 * torch.randn(2, 8, 50, generator=generator)
    peak = max(float(t.abs().max()) for t in [*prefill.values(), decode])
    prefill = {kind: t + shift * peak for kind, t in prefill.items()}
    # One greedy step, two rows: row 0 won by a margin of 3.0, row 1 by 0.1 (peak 30).
    greedy = module.GreedyRecord([[[(picks[0], 3.0, 30.0), (picks[1], 0.1, 30.0)]]])
    # Two beam steps; the first decision's closest candidates were 0.5 apart.
    beam = module.BeamRecord([[(0.5, 30.0, [[[1]]]), (0.5, 30.0, [[list(beams_at_step_1)]])]])
    return module.Outputs(prefill, decode, device, [[list(picks)]], greedy, [[list(beams_at_step_1)]], beam)


def test_comparison_passes_identical_outputs():
    module = _script()
    measured, failures = module.compare_outputs(_outputs(module), _outputs(module), 0.01, "cpu")
    assert failures == []
    assert measured["max_relative_logit_error"] == 0 and measured["greedy_identical"] and measured["beam_identical"]


def test_comparison_fails_logits_beyond_the_limit():
    module = _script()
    _, failures = module.compare_outputs(_outputs(module, shift=0.02), _outputs(module), 0.01, "cpu")
    assert any("causal_prefill logits" in f for f in failures)
    assert not any("cached_decode" in f for f in failures)


def test_comparison_excuses_only_near_tie_flips():
    module = _script()
    reference = _outputs(module)
    # Row 1 flips where the reference margin 0.1 <= 2 x 0.01 x 30: expected in half precision.
    measured, failures = module.compare_outputs(_outputs(module, picks=(5, 8)), reference, 0.01, "cpu")
    assert failures == [] and not measured["greedy_identical"]
    # Row 0 flips where the margin was 3.0: a real difference.
    measured, failures = module.compare_outputs(_outputs(module, picks=(6, 7)), reference, 0.01, "cpu")
    assert len(failures) == 1 and "greedy row 0" in failures[0]
    # Beams that differ after a decision whose gap 0.5 <= 4 x 0.01 x 30 pass; with a tighter
    # limit (4 x 0.001 x 30 = 0.12 < 0.5) they fail.
    other_beams = _outputs(module, beams_at_step_1=(1, 3))
    assert module.compare_outputs(other_beams, reference, 0.01, "cpu")[1] == []
    failures = module.compare_outputs(other_beams, reference, 0.001, "cpu")[1]
    assert any("beam-search beams differ after step 0" in f for f in failures)


def test_comparison_fails_logits_on_another_device():
    module = _script()
    _, failures = module.compare_outputs(_outputs(module, device="cpu"), _outputs(module), 0.01, "cuda:0")
    assert failures == ["logits came back on cpu, asked for cuda:0"]
