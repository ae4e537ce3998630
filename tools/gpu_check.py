"""The one-GPU check: half-precision parity, speed against bounds measured in the same run,
one GLM-130B tensor-parallel rank at its real shapes, and the GPU backends when present.

    tools/gpu_check.sh --report gpu-check.json                 # one NVIDIA GPU, --device cuda
    python tools/gpu_check.py --device cpu --report r.json     # dry run on CPU (implies --dry)

Parts, each one entry of the JSON report (status "ok", "failed" with the reason, or
"skipped" with what is missing, its measurements and its wall time); one part failing
does not stop the others, and the exit status is 1 if any part failed:

  torch_parity      glm-tiny (wide random weights) in float16 and bfloat16 on --device against
                    the float32 CPU reference: prompt logits, 8 cached decode steps, greedy and
                    beam-search tokens
  bench_decode      glm-bench in float16: one decode step at batch 1 and 8 over a past of 128,
                    against (weight + KV bytes) / the memory bandwidth measured here
  bench_prefill     glm-bench in float16: a 512-token prefill, against its matmul FLOPs / the
                    fp16 matmul throughput measured here (or its bytes / bandwidth if larger)
  glm130b_rank      rank 0 of GLM-130B at TP 8 (~32 GB of fp16 weights), one decode step over a
                    past of 128 and of 2047, against the bandwidth bound; no communication
  onnxruntime_cuda  a float16 glm-tiny package on ONNX Runtime's CUDAExecutionProvider
  tensorrt          glmc's tensorrt backend: a float16 glm-tiny `--target tensorrt` package against the
                    float32 reference (as above), its engine build time, and glm-bench (random
                    float16 weights) decoding at batch 1 and 8 over a past of 128 against the
                    bandwidth bound; skipped, with the reason, without the tensorrt package or a GPU

`--dry` (implied by `--device cpu`) runs the same code on small shapes in well under a
minute. A relative --report path is taken from the current folder (the repository root
under tools/gpu_check.sh, which changes to it).

glmc need not be installed: the script imports it from the repository it lives in,
mapping `backends/`, `graphs/` and `passes/` to `glmc.backends`, `glmc.graphs` and
`glmc.passes` as the package's setuptools `package-dir` does.

Test hook: with the environment variable GLMC_GPU_CHECK_FORCE_BOOTSTRAP=1 the script takes
that path even where glmc is installed, so that it can be tested on a development machine.
"""

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
FORCE_BOOTSTRAP_VARIABLE = "GLMC_GPU_CHECK_FORCE_BOOTSTRAP"
PARTS = ("torch_parity", "bench_decode", "bench_prefill", "glm130b_rank", "onnxruntime_cuda", "tensorrt")

# Logit tolerances, as max |actual - reference| / max |reference|, of a half-precision run of
# glm-tiny with wide random weights against the float32 CPU run of the same checkpoint (not
# against another run in the same dtype, where tests/tolerances.py allows 2e-3 for fp16).
# Three layers of wide random weights amplify rounding: on CPU, over 40 random 20-token
# prompts, float16 measured 0.027-0.11 (median 0.034) and bfloat16 0.19-0.55 (median 0.27),
# most of it from computing in half precision, not from rounding the weights. A real
# error is far larger: changing one prompt token moves the logits by 1.3 of the peak,
# dropping the causal mask by 1.5.
FLOAT16_LIMIT = 0.15
BFLOAT16_LIMIT = 0.6
LIMITS = {"float16": FLOAT16_LIMIT, "bfloat16": BFLOAT16_LIMIT}


# ---------------------------------------------------------------------------------------------
# Importing glmc from this repository
# ---------------------------------------------------------------------------------------------

# Package name -> its folder in the repository (pyproject.toml's package-dir).
PACKAGE_FOLDERS = {"glmc": "glmc", "glmc.backends": "backends", "glmc.graphs": "graphs",
                   "glmc.passes": "passes"}


class RepositoryPackages(importlib.abc.MetaPathFinder):
    """Finds glmc and its three remapped subpackages in the repository.

    Only the package roots are resolved here; their submodules (glmc.model,
    glmc.graphs.package, ...) are found by the normal machinery through each root's
    `__path__`, which points into the repository.
    """

    def __init__(self, repo: Path):
        self.repo = repo

    def find_spec(self, fullname, path=None, target=None):
        folder = PACKAGE_FOLDERS.get(fullname)
        if folder is None:
            return None
        init = self.repo / folder / "__init__.py"
        return importlib.util.spec_from_file_location(fullname, init,
                                                      submodule_search_locations=[str(init.parent)])


def _forget_glmc() -> None:
    for name in [n for n in sys.modules if n == "glmc" or n.startswith("glmc.")]:
        del sys.modules[name]


def bootstrap_glmc(repo: Path, force: bool) -> dict:
    """Make `import glmc` (with glmc.backends, .graphs, .passes) give this repository's code."""
    if not force:
        try:
            import glmc.backends  # noqa: F401
            import glmc.graphs  # noqa: F401
            import glmc.passes  # noqa: F401

            installed = Path(sys.modules["glmc"].__file__).resolve().parent
            if installed == repo / "glmc":
                return {"mode": "installed", "glmc": str(installed)}
            reason = f"the installed glmc ({installed}) is not this repository's"
        except ImportError as error:
            reason = f"glmc is not importable as installed ({error})"
        _forget_glmc()
    else:
        reason = f"{FORCE_BOOTSTRAP_VARIABLE}=1"
        _forget_glmc()
    # First on the meta path: ahead of any editable-install finder for the same names.
    sys.meta_path.insert(0, RepositoryPackages(repo))
    import glmc.backends
    import glmc.graphs
    import glmc.passes

    files = {name: sys.modules[name].__file__ for name in PACKAGE_FOLDERS}
    for name, file in files.items():
        if Path(file).resolve().parent != repo / PACKAGE_FOLDERS[name]:
            raise ImportError(f"{name} was imported from {file}, not from {repo / PACKAGE_FOLDERS[name]}")
    return {"mode": "repository", "reason": reason, "modules": files}


# ---------------------------------------------------------------------------------------------
# What each part runs on
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeCase:
    batch: int
    past: int  # cached tokens before the decoded one


@dataclass(frozen=True)
class Repeats:
    warmup: int
    repeats: int
    max_seconds: float  # stop repeating after this (at least 3 repetitions are kept)


@dataclass(frozen=True)
class ProbePlan:
    """The hardware bounds, measured with torch on the same device as the models."""

    copy_bytes: int  # each of src and dst of the device-to-device copy
    matvec_bytes: int  # the fp16 matrix of the matrix-vector product
    matmul_sizes: tuple[int, ...]  # square fp16 matmuls n x n x n
    repeats: Repeats


@dataclass(frozen=True)
class ParityPlan:
    dtypes: tuple[str, ...] = ("float16", "bfloat16")
    prompt_length: int = 20
    context: int = 12  # GLM prefix mask: the first `context - 1` tokens see each other
    decode_steps: int = 8  # cached decode steps after a prefill of `prompt_length - decode_steps`
    prompts: tuple[tuple[int, ...], ...] = ((31, 32, 33, 1000, 34, 35), (41, 42, 1001),
                                            (51, 1002, 52, 53, 54, 55, 56))  # [MASK], [gMASK], [sMASK]
    greedy_length: int = 30
    beam_length: int = 24


@dataclass(frozen=True)
class BenchPlan:
    name: str
    config: object  # glmc.config.GLMConfig (imported after the bootstrap)
    decode_cases: tuple[DecodeCase, ...]
    prefill_tokens: int
    repeats: Repeats


@dataclass(frozen=True)
class RankPlan:
    name: str
    config: object  # glmc.config.GLMConfig
    tp_size: int
    rank: int
    decode_cases: tuple[DecodeCase, ...]
    repeats: Repeats


@dataclass(frozen=True)
class Plan:
    device: str
    dry: bool
    probes: ProbePlan
    parity: ParityPlan
    bench: BenchPlan
    rank: RankPlan


MiB, GiB = 2**20, 2**30


def make_plan(device: str, dry: bool) -> Plan:
    from glmc.config import PRESETS, GLMConfig

    if not dry:
        return Plan(
            device=device, dry=False,
            probes=ProbePlan(copy_bytes=2 * GiB, matvec_bytes=2 * GiB, matmul_sizes=(4096, 8192),
                             repeats=Repeats(warmup=3, repeats=20, max_seconds=10.0)),
            parity=ParityPlan(),
            bench=BenchPlan("glm-bench", PRESETS["glm-bench"], (DecodeCase(1, 128), DecodeCase(8, 128)),
                            prefill_tokens=512, repeats=Repeats(warmup=5, repeats=50, max_seconds=20.0)),
            rank=RankPlan("glm-130b", PRESETS["glm-130b"], 8, 0, (DecodeCase(1, 128), DecodeCase(1, 2047)),
                          repeats=Repeats(warmup=3, repeats=20, max_seconds=30.0)))
    # Small shapes for a quick run of the same code; the bandwidth buffers stay larger than
    # a CPU's last-level cache (tens of MiB) so that they measure memory, not cache.
    return Plan(
        device=device, dry=True,
        probes=ProbePlan(copy_bytes=256 * MiB, matvec_bytes=256 * MiB, matmul_sizes=(256, 512),
                         repeats=Repeats(warmup=1, repeats=4, max_seconds=1.0)),
        parity=ParityPlan(),
        bench=BenchPlan("dry-bench", GLMConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                                               inner_hidden_size=512, vocab_size=4096, max_sequence_length=1024),
                        (DecodeCase(1, 128), DecodeCase(8, 128)), prefill_tokens=128,
                        repeats=Repeats(warmup=1, repeats=8, max_seconds=1.5)),
        rank=RankPlan("dry-rank", GLMConfig(num_layers=2, hidden_size=512, num_attention_heads=16,
                                            inner_hidden_size=1024, vocab_size=8192, max_sequence_length=2048),
                      8, 0, (DecodeCase(1, 128), DecodeCase(1, 2047)),
                      repeats=Repeats(warmup=1, repeats=8, max_seconds=1.5)))


# ---------------------------------------------------------------------------------------------
# Parts' results
# ---------------------------------------------------------------------------------------------


class Skipped(Exception):
    """The part cannot run here; the message names what is missing."""


class CheckFailed(Exception):
    """The part ran and one of its checks did not hold."""


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, CheckFailed):
        return text[:500]
    return f"{type(error).__name__}: {text}"[:500]


def run_part(name: str, fn: Callable[..., str], *args) -> dict:
    """Run one part; `fn(measurements, *args)` fills `measurements` and returns a one-line summary."""
    measurements: dict = {}
    start = time.perf_counter()
    summary, reason = None, None
    try:
        summary = fn(measurements, *args)
        status = "ok"
    except Skipped as error:
        status, reason = "skipped", str(error)
    except Exception as error:  # one part failing must not stop the others
        status, reason = "failed", one_line(error)
    finally:
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    return {"status": status, "reason": reason, "summary": summary, "measurements": measurements,
            "seconds": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------------------------------------
# Timing and the hardware bounds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timer:
    """Wall time of a call: CUDA events around it on a GPU, time.perf_counter on the CPU."""

    device: torch.device

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, fn: Callable[[], object], repeats: Repeats) -> list[float]:
        """Seconds of each repetition after the warm-up."""
        for _ in range(repeats.warmup):
            fn()
        self.synchronize()
        deadline = time.perf_counter() + repeats.max_seconds
        if self.device.type == "cuda":
            events = []
            for i in range(repeats.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events.append((start, end))
                if i >= 2 and time.perf_counter() > deadline:
                    break
            self.synchronize()
            return [start.elapsed_time(end) / 1e3 for start, end in events]
        seconds = []
        for i in range(repeats.repeats):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
            if i >= 2 and time.perf_counter() > deadline:
                break
        return seconds


@dataclass(frozen=True)
class Bounds:
    bandwidth: float  # bytes/s: the best of the probes below
    bandwidth_probe: str
    matmul_flops: float  # fp16 FLOP/s: the best matmul below
    matmul_probe: str
    probes: dict  # every probe's best value


def linear_shapes(config, tp_size: int, tokens: int) -> list[tuple[int, int, int]]:
    """(tokens, in, out) of each distinct linear layer of one rank, as F.linear runs it."""
    h, inner, width = config.hidden_size, config.inner_hidden_size // tp_size, config.hidden_size // tp_size
    return sorted({(tokens, h, 3 * width), (tokens, width, h), (tokens, h, 2 * inner), (tokens, inner, h)})


@torch.inference_mode()
def measure_bounds(plan: Plan, timer: Timer) -> Bounds:
    """Memory bandwidth and fp16 matmul throughput as torch reaches them on this device.

    A bound must never be slower than the hardware, so each is the best of several probes:
    bandwidth from a device-to-device copy (read + write bytes) and an fp16 matrix-vector
    product (the matrix's bytes); matmul throughput from square matmuls and from the
    prefill's own linear-layer shapes (2 * M * N * K FLOPs each).
    """
    device, probes = timer.device, {}
    half = torch.float16

    src = torch.empty(plan.probes.copy_bytes // 2, dtype=half, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = min(timer.measure(lambda: dst.copy_(src), plan.probes.repeats))
    probes["copy_bytes_per_s"] = 2 * src.numel() * 2 / seconds
    del src, dst

    columns = 16384
    rows = plan.probes.matvec_bytes // (2 * columns)
    matrix = torch.empty(rows, columns, dtype=half, device=device).normal_(0, 0.02)  # [rows, columns]
    vector = torch.randn(1, columns, dtype=half, device=device)  # [1, columns]
    seconds = min(timer.measure(lambda: F.linear(vector, matrix), plan.probes.repeats))
    probes["matvec_bytes_per_s"] = matrix.numel() * 2 / seconds
    del matrix, vector

    for n in plan.probes.matmul_sizes:
        a = torch.randn(n, n, dtype=half, device=device)
        b = torch.randn(n, n, dtype=half, device=device)
        seconds = min(timer.measure(lambda: torch.matmul(a, b), plan.probes.repeats))
        probes[f"matmul_{n}x{n}x{n}_flops_per_s"] = 2 * n**3 / seconds
        del a, b
    for tokens, k, n in linear_shapes(plan.bench.config, 1, plan.bench.prefill_tokens):
        x = torch.randn(tokens, k, dtype=half, device=device)  # [tokens, in]
        w = torch.randn(n, k, dtype=half, device=device) * 0.02  # [out, in]
        seconds = min(timer.measure(lambda: F.linear(x, w), plan.probes.repeats))
        probes[f"linear_{tokens}x{k}x{n}_flops_per_s"] = 2 * tokens * k * n / seconds
        del x, w

    bandwidth_probe = max(("copy_bytes_per_s", "matvec_bytes_per_s"), key=probes.get)
    matmul_probe = max((k for k in probes if k.endswith("flops_per_s")), key=probes.get)
    return Bounds(probes[bandwidth_probe], bandwidth_probe, probes[matmul_probe], matmul_probe, probes)


# ---------------------------------------------------------------------------------------------
# Part 1: torch_parity (and the reference the GPU backends are compared with)
# ---------------------------------------------------------------------------------------------


def parity_prompt(kind: str, plan: ParityPlan, batch: int = 2, seed: int = 0):
    """tokens, positions [batch, s]; mask [batch, 1, s, s] bool, True = masked (SAT's convention).

    "causal": every token sees those before it; "gmask": GLM's prefix mask, the first
    `context - 1` tokens see each other, the rest causally.
    """
    length = plan.prompt_length
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, 1000, (batch, length)))
    positions = torch.arange(length).repeat(batch, 1)
    mask = ~torch.ones(length, length, dtype=torch.bool).tril()
    if kind == "gmask":
        mask[:, : plan.context - 1] = False
    return tokens, positions, mask[None, None].repeat(batch, 1, 1, 1)


@dataclass
class GreedyRecord:
    """Per generation call, per step, per row: (pick, top-2 logit margin, max |logit|), None once done."""

    calls: list = field(default_factory=list)


def recording_greedy(record: GreedyRecord):
    from glmc.generation.strategies import BaseStrategy

    class RecordingGreedy(BaseStrategy):
        """Greedy decoding (top_k=1), also recording each step's pick and top-2 margin per row."""

        def __init__(self):
            super().__init__(top_k=1)

        def start(self, batch_size, end_tokens, generators=None):
            run = super().start(batch_size, end_tokens, generators)
            record.calls.append([])
            step = run.step

            def recording_step(logits, tokens):
                done = list(run.done)
                flat = logits.reshape(logits.shape[0], -1).float()  # [batch, vocab]
                top2 = flat.topk(2, dim=-1).values
                margins = (top2[:, 0] - top2[:, 1]).tolist()
                peaks = flat.abs().max(dim=-1).values.tolist()
                out, parents = step(logits, tokens)
                record.calls[-1].append([None if d else (out[r][0][-1], margins[r], peaks[r])
                                         for r, d in enumerate(done)])
                return out, parents

            run.step = recording_step
            return run

    return RecordingGreedy()


@dataclass
class BeamRecord:
    """Per generation call, per step: (smallest gap between adjacent candidate scores, max |logit|,
    the beams the step started from)."""

    calls: list = field(default_factory=list)


def recording_beam_search(record: BeamRecord):
    from glmc.generation.strategies import BeamSearchStrategy

    class RecordingBeamSearch(BeamSearchStrategy):
        """BeamSearchStrategy(3, 1.0, no_repeat_ngram_size=3, min_gen_length=2), also recording how
        close its candidates were: the smallest gap between adjacent joint scores among the
        candidates it ranks (a swap there could change the beams)."""

        def __init__(self):
            super().__init__(3, 1.0, no_repeat_ngram_size=3, min_gen_length=2)

        def start(self, batch_size, end_tokens, generators=None):
            run = super().start(batch_size, end_tokens, generators)
            record.calls.append([])
            step = run.step

            def recording_step(logits, tokens):
                beams = [[list(seq) for seq in row] for row in tokens]
                record.calls[-1].append((_smallest_gap(run, logits, tokens), float(logits.float().abs().max()),
                                         beams))
                return step(logits, tokens)

            run.step = recording_step
            return run

    def _smallest_gap(run, logits, tokens) -> float:
        # The joint scores the beam search ranks (on a copy: it filters float32 in place).
        flat = run.joint_scores(logits.float().clone(), tokens)
        count = (max(1, len(run.end_tokens)) + 1) * run.num_beams
        top = flat.topk(min(count + 1, flat.shape[1]), dim=-1).values  # [batch, count + 1]
        gaps = (top[:, :-1] - top[:, 1:]).min(dim=-1).values
        live = [gap for gap, row in zip(gaps.tolist(), run.rows) if not row.done]
        return min(live) if live else math.inf

    return RecordingBeamSearch()


@dataclass
class Outputs:
    """What one model gives on the parity inputs."""

    prefill: dict  # kind -> logits [2, s, vocab] float32, on the CPU
    decode: torch.Tensor  # [2, decode_steps, vocab]: each cached step's logits
    logits_device: str  # where the model returned its logits
    greedy_tokens: list
    greedy: GreedyRecord
    beam_tokens: list
    beam: BeamRecord


def model_outputs(model, plan: ParityPlan) -> Outputs:
    prefill, device = {}, None
    for kind in ("causal", "gmask"):
        tokens, positions, mask = parity_prompt(kind, plan)
        logits, _ = model.logits(tokens, positions, mask)
        device = str(logits.device)
        prefill[kind] = logits.cpu()
    tokens, positions, mask = parity_prompt("gmask", plan)
    start = plan.prompt_length - plan.decode_steps
    _, cache = model.logits(tokens[:, :start], positions[:, :start], mask[..., :start, :start])
    steps = []
    for i in range(start, plan.prompt_length):
        logits, cache = model.logits(tokens[:, i:i + 1], positions[:, i:i + 1], mask[..., i:i + 1, :i + 1], cache)
        steps.append(logits[:, -1].cpu())
    prompts = [list(p) for p in plan.prompts]
    greedy, beam = GreedyRecord(), BeamRecord()
    greedy_tokens = [r.token_ids for r in model.generate(prompts, recording_greedy(greedy),
                                                         out_seq_length=plan.greedy_length)]
    beam_tokens = [r.token_ids for r in model.generate(prompts, recording_beam_search(beam),
                                                       out_seq_length=plan.beam_length)]
    return Outputs(prefill, torch.stack(steps, 1), device, greedy_tokens, greedy, beam_tokens, beam)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (NaN anywhere gives NaN)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise CheckFailed(f"logits shape {list(a.shape)} != reference {list(e.shape)}")
    peak = float(e.abs().max()) or 1.0
    return float((a - e).abs().max()) / peak


def greedy_divergences(got: GreedyRecord, reference: GreedyRecord) -> list[dict]:
    """Per row, the first step where the picks differ, with the reference's margin there."""
    found = []
    for call, (got_steps, ref_steps) in enumerate(zip(got.calls, reference.calls)):
        diverged: set[int] = set()
        for step, (got_rows, ref_rows) in enumerate(zip(got_steps, ref_steps)):
            for row, (g, r) in enumerate(zip(got_rows, ref_rows)):
                if row in diverged or r is None or g is None or g[0] == r[0]:
                    continue
                diverged.add(row)
                found.append({"call": call, "step": step, "row": row, "reference_pick": r[0], "pick": g[0],
                              "reference_margin": r[1], "reference_peak": r[2]})
    return found


def beam_divergence(got: BeamRecord, reference: BeamRecord) -> tuple[int, int] | None:
    """(call, step) of the first reference decision whose resulting beams differ, None if every step
    started from the same beams (then only the ranking of finished beams differed)."""
    for call, (got_steps, ref_steps) in enumerate(zip(got.calls, reference.calls)):
        for step, (g, r) in enumerate(zip(got_steps, ref_steps)):
            if g[2] != r[2]:
                return call, step - 1  # step 0 starts from the contexts, which agree
        if len(got_steps) != len(ref_steps):
            return call, min(len(got_steps), len(ref_steps)) - 1
    return None


def compare_outputs(got: Outputs, reference: Outputs, limit: float,
                    expected_device: str | None) -> tuple[dict, list[str]]:
    """Measurements and failures of `got` against the float32 reference, at logit tolerance `limit`."""
    failures = []
    errors = {f"{kind}_prefill": relative_error(got.prefill[kind], reference.prefill[kind]) for kind in got.prefill}
    errors["cached_decode"] = relative_error(got.decode, reference.decode)
    worst = max(errors.values())
    for name, value in errors.items():
        if not value <= limit:
            failures.append(f"{name} logits {value:.3g} of the peak > limit {limit:g}")

    # Greedy: a flip is expected where the reference's top-2 margin is within what two
    # logits, each off by up to limit * peak, can close.
    margins = [(r[1], r[1] / r[2] if r[2] else math.inf) for steps in reference.greedy.calls
               for rows in steps for r in rows if r is not None]
    divergences = greedy_divergences(got.greedy, reference.greedy)
    unexplained = [d for d in divergences if d["reference_margin"] > 2 * limit * d["reference_peak"]]
    greedy_identical = got.greedy_tokens == reference.greedy_tokens
    if not greedy_identical and not divergences:
        failures.append("greedy tokens differ but no step's pick differs")
    for d in unexplained:
        failures.append(f"greedy row {d['row']} step {d['step']}: picked {d['pick']}, reference "
                        f"{d['reference_pick']} by a margin {d['reference_margin']:.3g} > 2 x {limit:g} x peak")

    # Beam search: joint scores are sums of log-softmaxes, each moved by up to 2 * limit * peak
    # per step, so after t steps two candidates can swap where the reference's gap between
    # them was within 4 * limit * peak * t. The decision checked is the first one after which
    # the beams differ; when every step started from the same beams, any near tie explains it.
    def near_tie(step: int, gap: float, peak: float) -> bool:
        return gap <= 4 * limit * peak * (step + 1)

    gaps = [(step, gap, peak) for steps in reference.beam.calls for step, (gap, peak, _) in enumerate(steps)]
    beam_identical = got.beam_tokens == reference.beam_tokens
    divergence = None if beam_identical else beam_divergence(got.beam, reference.beam)
    if beam_identical:
        beam_explained = True
    elif divergence is not None and divergence[1] >= 0:
        call, step = divergence
        gap, peak, _ = reference.beam.calls[call][step]
        beam_explained = near_tie(step, gap, peak)
        if not beam_explained:
            failures.append(f"beam-search beams differ after step {step}, where the reference's closest "
                            f"candidates were {gap:.3g} apart > 4 x {limit:g} x peak x {step + 1}")
    else:
        beam_explained = any(near_tie(*g) for g in gaps)
        if not beam_explained:
            failures.append("beam-search results differ although every reference decision was separated by "
                            f"more than 4 x {limit:g} x peak per step")

    device_ok = expected_device is None or got.logits_device == expected_device
    if not device_ok:
        failures.append(f"logits came back on {got.logits_device}, asked for {expected_device}")
    measured = {
        "limit": limit, "max_relative_logit_error": worst, "relative_logit_errors": errors,
        "logits_device": got.logits_device,
        "greedy_identical": greedy_identical,
        "greedy_divergences": divergences,
        "greedy_reference_min_margin": min(m for m, _ in margins) if margins else None,
        "greedy_reference_min_margin_of_peak": min(r for _, r in margins) if margins else None,
        "beam_identical": beam_identical,
        "beam_divergence": None if divergence is None else {"call": divergence[0], "step": divergence[1]},
        "beam_reference_min_gap": min((g for _, g, _ in gaps), default=None),
        "beam_difference_explained": beam_explained,
    }
    return measured, failures


def describe_comparison(measured: dict) -> str:
    # Tokens that differ only pass where the reference had a near tie.
    greedy = "same" if measured["greedy_identical"] else "near-tie flip"
    beam = "same" if measured["beam_identical"] else "near-tie flip"
    return (f"logits {measured['max_relative_logit_error']:.2e} of peak (limit {measured['limit']:g}), "
            f"greedy {greedy}, beam {beam}")


def device_string(device: str) -> str:
    """The device torch reports for tensors placed on `device` ("cuda" -> "cuda:0")."""
    placed = torch.device(device)
    if placed.type == "cuda" and placed.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(placed)


@dataclass(frozen=True)
class TinyFixture:
    checkpoint: Path
    reference: Outputs


def make_tiny_fixture(root: Path, plan: Plan) -> TinyFixture:
    """glm-tiny with wide random weights as a SAT checkpoint, and its float32 CPU outputs."""
    import glmc
    from glmc.checkpoint import model_state, save_checkpoint
    from glmc.config import PRESETS
    from glmc.model import GLMModel
    from glmc.model.init import init_wide_random_
    from glmc.tokenizer import SpecialTokens

    config = PRESETS["glm-tiny"]
    model = init_wide_random_(GLMModel(config), seed=1).eval()
    checkpoint = root / "glm-tiny"
    save_checkpoint(checkpoint, config, [model_state(model)], iteration="1000",
                    metadata={"special_tokens": SpecialTokens.from_base(1000, eos=20).to_dict()})
    reference = glmc.load(checkpoint, backend="torch", dtype="float32", device="cpu")
    return TinyFixture(checkpoint, model_outputs(reference, plan.parity))


def part_torch_parity(measurements: dict, plan: Plan, fixture: TinyFixture) -> str:
    import glmc

    failures, summary = [], []
    for dtype in plan.parity.dtypes:
        model = glmc.load(fixture.checkpoint, backend="torch", dtype=dtype, device=plan.device)
        measured, failed = compare_outputs(model_outputs(model, plan.parity), fixture.reference,
                                           LIMITS[dtype], device_string(plan.device))
        measurements[dtype] = measured
        failures += [f"{dtype}: {f}" for f in failed]
        summary.append(f"{dtype} {describe_comparison(measured)}")
        del model
    measurements["reference_greedy_min_margin"] = measurements[plan.parity.dtypes[0]]["greedy_reference_min_margin"]
    if failures:
        raise CheckFailed("; ".join(failures))
    return "; ".join(summary) + f"; on {device_string(plan.device)}"


# ---------------------------------------------------------------------------------------------
# Parts 2 and 3: speed against the bounds
# ---------------------------------------------------------------------------------------------


class SingleRankStandIn:
    """Replaces the 8-rank NCCL all-reduce and all-gather of a tensor-parallel rank with identities.

    The rank then computes exactly its own share of a TP-8 step (its heads, its GeGLU
    slice, its vocabulary rows) while the other seven are absent, so the numbers measured
    with it exclude all communication. Its outputs are partial sums, not the model's
    values: only the speed means anything.
    """

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return x  # [b, s, vocab / tp]: this rank's vocabulary-parallel logits


@torch.no_grad()
def fill_random_(model, seed: int) -> None:
    """N(0, 0.02) weights and biases, drawn on the model's own device (LayerNorms keep 1 and 0).

    glmc.model.init.init_wide_random_ draws on the CPU and copies, which for a 32 GB rank
    would take minutes; the speed parts need no particular values.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "layernorm" not in name:
            param.normal_(0.0, 0.02, generator=generator)


def build_random_model(config, tp_size: int, rank: int, device: torch.device, comm=None):
    """A float16 GLMModel allocated directly on `device` (no CPU copy), random weights."""
    from glmc.config import Mapping
    from glmc.model import GLMModel

    with device:
        model = GLMModel(config, Mapping(tp_size, rank), dtype=torch.float16, comm=comm).eval()
    fill_random_(model, seed=0)
    return model


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def timing_summary(seconds: list[float], bound: float, tokens: int) -> dict:
    median, best = statistics.median(seconds), min(seconds)
    return {"median_ms": median * 1e3, "min_ms": best * 1e3, "repeats": len(seconds), "bound_ms": bound * 1e3,
            "fraction_of_bound": bound / median, "best_fraction_of_bound": bound / best,
            "tokens_per_s": tokens / median}


def check_fraction(name: str, result: dict) -> None:
    if result["best_fraction_of_bound"] > 1.0:
        raise CheckFailed(f"bound measured wrong: {name} ran at {result['best_fraction_of_bound']:.2f} of its "
                          f"bound ({result['min_ms']:.3f} ms < bound {result['bound_ms']:.3f} ms)")


@torch.inference_mode()
def time_decode(model, case: DecodeCase, timer: Timer, bounds: Bounds, repeats: Repeats) -> dict:
    """One decode step of `case.batch` tokens over a KV cache of `case.past`, against the bandwidth bound."""
    config, tp = model.config, model.mapping.tp_size
    device, b = timer.device, case.batch
    heads, head_dim = config.num_attention_heads // tp, config.head_dim
    cache = [(torch.randn(b, heads, case.past, head_dim, dtype=torch.float16, device=device),  # k [b, heads, past, hd]
              torch.randn(b, heads, case.past, head_dim, dtype=torch.float16, device=device))  # v
             for _ in range(config.num_layers)]
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache)
    tokens = torch.randint(0, config.vocab_size // tp, (b, 1), device=device)  # rows this rank holds
    positions = torch.full((b, 1), case.past, dtype=torch.long, device=device)
    mask = torch.zeros(b, 1, 1, case.past + 1, dtype=torch.bool, device=device)  # nothing masked

    def step():
        return model(tokens, positions, mask, cache)

    logits_shape = list(step().logits.shape)
    seconds = timer.measure(step, repeats)
    weight_bytes = parameter_bytes(model)
    # Every weight is read once per step (the tied embedding by the output projection),
    # and all past keys and values; writing the extended cache is not counted.
    bound = (weight_bytes + kv_bytes) / bounds.bandwidth
    result = {"batch": b, "past": case.past, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
              "logits_shape": logits_shape, **timing_summary(seconds, bound, b)}
    del cache
    return result


def describe_decode(result: dict) -> str:
    return (f"b{result['batch']} past{result['past']} {result['median_ms']:.3f} ms, "
            f"{result['tokens_per_s']:.0f} tokens/s, {result['fraction_of_bound']:.1%} of the bound "
            f"{result['bound_ms']:.3f} ms")


def machine_bounds(bounds: Bounds | str) -> Bounds:
    if isinstance(bounds, str):
        raise CheckFailed(f"the hardware bounds were not measured: {bounds}")
    return bounds


def part_bench_decode(measurements: dict, plan: Plan, timer: Timer, bounds: Bounds | str) -> str:
    bounds = machine_bounds(bounds)
    model = build_random_model(plan.bench.config, 1, 0, timer.device)
    measurements.update(model=plan.bench.name, parameters=sum(p.numel() for p in model.parameters()),
                        bandwidth_bytes_per_s=bounds.bandwidth, cases=[])
    for case in plan.bench.decode_cases:
        measurements["cases"].append(time_decode(model, case, timer, bounds, plan.bench.repeats))
    del model
    for result in measurements["cases"]:
        check_fraction(f"decode b{result['batch']} past{result['past']}", result)
    return "; ".join(describe_decode(r) for r in measurements["cases"])


def prefill_flops(config, tokens: int) -> int:
    """Matmul FLOPs of a prefill of `tokens` (batch 1) with last-position logits only.

    2 * weights * tokens for the layers' linear layers, 2 * vocab * hidden for the one logit
    row, and per layer the full [s, s] scores and probabilities x values that the model
    computes (masked entries included): 2 * 2 * s * s * hidden.
    """
    h, inner = config.hidden_size, config.inner_hidden_size
    per_token = 2 * (3 * h * h + h * h + 2 * inner * h + inner * h) * config.num_layers
    attention = 2 * 2 * tokens * tokens * h * config.num_layers
    return per_token * tokens + 2 * config.vocab_size * h + attention


def part_bench_prefill(measurements: dict, plan: Plan, timer: Timer, bounds: Bounds | str) -> str:
    bounds = machine_bounds(bounds)
    model = build_random_model(plan.bench.config, 1, 0, timer.device)
    n, device = plan.bench.prefill_tokens, timer.device
    tokens = torch.randint(0, plan.bench.config.vocab_size, (1, n), device=device)  # [1, n]
    positions = torch.arange(n, device=device)[None]  # [1, n]
    mask = ~torch.ones(n, n, dtype=torch.bool, device=device).tril()[None, None]  # [1, 1, n, n], causal

    @torch.inference_mode()
    def prefill():
        return model(tokens, positions, mask, last_logits_only=True)

    seconds = timer.measure(prefill, plan.bench.repeats)
    flops, weight_bytes = prefill_flops(plan.bench.config, n), parameter_bytes(model)
    compute, memory = flops / bounds.matmul_flops, weight_bytes / bounds.bandwidth
    bound = max(compute, memory)
    result = {"model": plan.bench.name, "batch": 1, "tokens": n, "flops": flops, "weight_bytes": weight_bytes,
              "matmul_flops_per_s": bounds.matmul_flops, "compute_bound_ms": compute * 1e3,
              "bandwidth_bound_ms": memory * 1e3, "bound": "compute" if compute >= memory else "bandwidth",
              **timing_summary(seconds, bound, n)}
    measurements.update(result)
    del model
    check_fraction(f"prefill {n}", result)
    return (f"{n} tokens {result['median_ms']:.2f} ms, {result['tokens_per_s']:.0f} tokens/s "
            f"({result['fraction_of_bound']:.1%} of the {result['bound']} bound {result['bound_ms']:.3f} ms)")


def part_glm130b_rank(measurements: dict, plan: Plan, timer: Timer, bounds: Bounds | str) -> str:
    bounds = machine_bounds(bounds)
    rank = plan.rank
    if timer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(timer.device)
    model = build_random_model(rank.config, rank.tp_size, rank.rank, timer.device, comm=SingleRankStandIn())
    measurements.update(model=rank.name, tp_size=rank.tp_size, rank=rank.rank,
                        communication="excluded (SingleRankStandIn replaces the NCCL all-reduce/all-gather)",
                        parameters=sum(p.numel() for p in model.parameters()),
                        bandwidth_bytes_per_s=bounds.bandwidth, cases=[])
    try:
        for case in rank.decode_cases:
            measurements["cases"].append(time_decode(model, case, timer, bounds, rank.repeats))
    finally:
        del model  # about 32 GB at the real shapes
        gc.collect()
        if timer.device.type == "cuda":
            measurements["peak_memory_bytes"] = torch.cuda.max_memory_allocated(timer.device)
            torch.cuda.empty_cache()
    expected = [1, 1, rank.config.vocab_size // rank.tp_size]
    measurements["logits_shape"] = measurements["cases"][0]["logits_shape"]
    for result in measurements["cases"]:
        if result["logits_shape"] != expected:
            raise CheckFailed(f"vocab-parallel logits {result['logits_shape']}, expected {expected}")
        check_fraction(f"decode past{result['past']}", result)
    return ("; ".join(describe_decode(r) for r in measurements["cases"])
            + f"; logits {measurements['logits_shape']}")


# ---------------------------------------------------------------------------------------------
# Parts 4 and 5: the GPU backends
# ---------------------------------------------------------------------------------------------


def compare_backend(measurements: dict, plan: Plan, fixture: TinyFixture, model) -> str:
    measured, failures = compare_outputs(model_outputs(model, plan.parity), fixture.reference, FLOAT16_LIMIT, None)
    measurements.update(measured)
    if failures:
        raise CheckFailed("; ".join(failures))
    return f"float16 {describe_comparison(measured)}; logits on {measured['logits_device']}"


def part_onnxruntime_cuda(measurements: dict, plan: Plan, fixture: TinyFixture, root: Path) -> str:
    if importlib.util.find_spec("onnxruntime") is None:
        raise Skipped("onnxruntime is not installed")
    from glmc.backends.onnxruntime import import_onnxruntime

    ort = import_onnxruntime()  # refuses onnxruntime and onnxruntime-gpu installed together
    providers = ort.get_available_providers()
    measurements.update(onnxruntime=ort.__version__, providers=providers)
    if "CUDAExecutionProvider" not in providers:
        raise Skipped(f"onnxruntime-gpu is not installed (CUDAExecutionProvider unavailable; onnxruntime "
                      f"{ort.__version__} offers {', '.join(providers)})")
    if torch.device(plan.device).type != "cuda":
        raise Skipped(f"--device {plan.device}: the CUDAExecutionProvider check needs --device cuda")
    import glmc
    from glmc.api import export

    start = time.perf_counter()
    package = export(fixture.checkpoint, root / "tiny-ort-fp16", dtype="float16")
    measurements["export_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    model = glmc.load(package, backend="onnxruntime", device=plan.device)
    measurements["load_seconds"] = time.perf_counter() - start
    return compare_backend(measurements, plan, fixture, model)


def part_tensorrt(measurements: dict, plan: Plan, fixture: TinyFixture, root: Path, timer: Timer,
                  bounds: Bounds | str) -> str:
    if importlib.util.find_spec("tensorrt") is None:
        raise Skipped("tensorrt is not installed")
    try:
        import tensorrt
    except (ImportError, OSError) as error:  # a wheel whose libraries do not load
        raise Skipped(f"tensorrt does not import: {one_line(error)}") from None
    measurements["tensorrt"] = getattr(tensorrt, "__version__", None)
    if torch.device(plan.device).type != "cuda":
        raise Skipped(f"--device {plan.device}: TensorRT needs --device cuda")
    import glmc
    from glmc.api import export

    # Parity: glm-tiny in float16 against the float32 CPU reference.
    start = time.perf_counter()
    package = export(fixture.checkpoint, root / "tiny-trt-fp16", dtype="float16", target="tensorrt")
    measurements["export_seconds"] = time.perf_counter() - start
    lines: list[str] = []
    start = time.perf_counter()
    model = glmc.load(package, backend="tensorrt", device=plan.device, cache_dir=root, progress=lines.append)
    measurements["load_seconds"] = time.perf_counter() - start  # includes building the engines
    measurements["engine_build_seconds"] = model.executable.build_seconds
    measurements["collectives"] = model.executable.collectives
    measurements["build_log"] = lines[-20:]
    measured, failures = compare_outputs(model_outputs(model, plan.parity), fixture.reference, FLOAT16_LIMIT, None)
    measurements.update(measured)
    del model
    parity = f"float16 {describe_comparison(measured)}; engines built in {measurements['engine_build_seconds']:.1f} s"

    # Speed: glm-bench decoding on its engines, against the bandwidth bound.
    bounds = machine_bounds(bounds)
    bench = bench_package(plan, root)
    start = time.perf_counter()
    model = glmc.load(bench, backend="tensorrt", device=plan.device, cache_dir=root)
    measurements["bench_load_seconds"] = time.perf_counter() - start
    measurements["bench_engine_build_seconds"] = model.executable.build_seconds
    measurements["cases"] = [time_tensorrt_decode(model.executable, case, timer, bounds, plan.bench.repeats)
                             for case in plan.bench.decode_cases]
    del model
    for result in measurements["cases"]:
        check_fraction(f"tensorrt decode b{result['batch']} past{result['past']}", result)
    if failures:
        raise CheckFailed("; ".join(failures))
    return f"{parity}; {plan.bench.name} " + "; ".join(describe_decode(r) for r in measurements["cases"])


def bench_package(plan: Plan, root: Path) -> Path:
    """plan.bench's model with random float16 weights, exported for TensorRT."""
    from glmc.api import export
    from glmc.checkpoint import model_state, save_checkpoint

    model = build_random_model(plan.bench.config, 1, 0, torch.device("cpu"))
    # LayerNorms too: the export's cleanup merges equal constants, and freshly initialised norms
    # (all ones, all zeros) would leave parameters stored under another one's name.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype), alpha=0.02)
    save_checkpoint(root / "bench-ckpt", plan.bench.config, [model_state(model)], iteration="1")
    del model
    return export(root / "bench-ckpt", root / "bench-trt-fp16", dtype="float16", target="tensorrt")


@torch.inference_mode()
def time_tensorrt_decode(executable, case: DecodeCase, timer: Timer, bounds: Bounds, repeats: Repeats) -> dict:
    """One decode step of `case.batch` tokens over a KV cache of `case.past` on the decode engine."""
    config, package, device, b = executable.config, executable.package, executable.device, case.batch
    heads, head_dim = config.num_attention_heads, config.head_dim
    cache = [torch.randn(b, heads, case.past, head_dim, dtype=torch.float16, device=device)  # [b, heads, past, hd]
             for _ in range(2 * config.num_layers)]  # keys of every layer, then values
    kv_bytes = sum(t.numel() * t.element_size() for t in cache)
    tokens = torch.randint(0, config.vocab_size, (b, 1), device=device)
    positions = torch.full((b, 1), case.past, dtype=torch.long, device=device)
    mask = torch.zeros(b, 1, 1, case.past + 1, dtype=torch.bool, device=device)  # nothing masked

    def step():
        return executable.decode(tokens, positions, mask, cache)

    logits_shape = list(step()[0].shape)
    seconds = timer.measure(step, repeats)
    tensors = package.manifest["ranks"][0]["tensors"]
    # The decode engine reads each of its weights once per step (its own copy, built from these).
    weight_bytes = sum(tensors[name]["length"] for name in package.graph_weights(0, "step"))
    bound = (weight_bytes + kv_bytes) / bounds.bandwidth
    result = {"batch": b, "past": case.past, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
              "logits_shape": logits_shape, **timing_summary(seconds, bound, b)}
    del cache
    return result


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def finite(value):
    """The report as strict JSON: NaN and infinities become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_report(path: Path, report: dict) -> None:
    """Write atomically: a temporary file beside the target, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as out:
            json.dump(finite(report), out, indent=2)
            out.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def table(report: dict) -> str:
    lines = []
    machine = report["machine"]
    if machine.get("status") == "ok":
        lines.append(f"machine: {machine['device_name']}, {machine['threads']} CPU threads, bandwidth "
                     f"{machine['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({machine['bandwidth_probe']}), fp16 matmul "
                     f"{machine['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s ({machine['matmul_probe']})")
    else:
        lines.append(f"machine: bounds not measured ({machine.get('reason')})")
    head = f"{'part':<18}{'status':<9}{'seconds':>8}  result"
    lines += [head, "-" * 100]
    for name, part in report["parts"].items():
        text = part["summary"] if part["status"] == "ok" else part["reason"]
        lines.append(f"{name:<18}{part['status']:<9}{part['seconds']:>8.1f}  {text}")
    lines.append(f"total {report['seconds']:.1f} s; report: {report['report_path']}")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True, type=Path, help="where the JSON report is written")
    parser.add_argument("--device", default="cuda", help="cuda (or cuda:N) or cpu; cpu implies --dry")
    parser.add_argument("--dry", action="store_true", help="the same checks on small shapes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads for the whole run, bounds included (default: torch's own)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    bootstrap = bootstrap_glmc(REPO, force=os.environ.get(FORCE_BOOTSTRAP_VARIABLE) == "1")
    device = torch.device(args.device)
    plan = make_plan(args.device, dry=args.dry or device.type == "cpu")
    timer = Timer(device)
    report: dict = {
        "device": args.device, "dry": plan.dry, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "threads": torch.get_num_threads(), "bootstrap": bootstrap,
        "report_path": str(args.report),
    }
    parts: dict[str, dict] = {}

    with tempfile.TemporaryDirectory(prefix="glmc-gpu-check-") as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        try:
            fixture: TinyFixture | str = make_tiny_fixture(root, plan)
            report["reference"] = {"status": "ok", "seconds": round(time.perf_counter() - start, 3)}
        except Exception as error:
            fixture = one_line(error)
            report["reference"] = {"status": "failed", "reason": fixture,
                                   "seconds": round(time.perf_counter() - start, 3)}

        def with_fixture(part):
            def run(measurements, *rest):
                if isinstance(fixture, str):
                    raise CheckFailed(f"the float32 glm-tiny reference failed: {fixture}")
                return part(measurements, plan, fixture, *rest)
            return run

        parts["torch_parity"] = run_part("torch_parity", with_fixture(part_torch_parity))

        start = time.perf_counter()
        try:
            bounds: Bounds | str = measure_bounds(plan, timer)
            report["machine"] = {"status": "ok", "device_name": device_name(device),
                                 "threads": torch.get_num_threads(),
                                 "bandwidth_bytes_per_s": bounds.bandwidth, "bandwidth_probe": bounds.bandwidth_probe,
                                 "matmul_flops_per_s": bounds.matmul_flops, "matmul_probe": bounds.matmul_probe,
                                 "probes": bounds.probes}
        except Exception as error:
            bounds = one_line(error)
            report["machine"] = {"status": "failed", "reason": bounds}
        report["machine"]["seconds"] = round(time.perf_counter() - start, 3)
        gc.collect()
        if device.type == "cuda" and torch.cuda.is_available():
            report["machine"]["total_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.empty_cache()

        parts["bench_decode"] = run_part("bench_decode", part_bench_decode, plan, timer, bounds)
        parts["bench_prefill"] = run_part("bench_prefill", part_bench_prefill, plan, timer, bounds)
        parts["glm130b_rank"] = run_part("glm130b_rank", part_glm130b_rank, plan, timer, bounds)
        parts["onnxruntime_cuda"] = run_part("onnxruntime_cuda", with_fixture(part_onnxruntime_cuda), root)
        parts["tensorrt"] = run_part("tensorrt", with_fixture(part_tensorrt), root, timer, bounds)

    assert tuple(parts) == PARTS
    report["parts"] = parts
    report["seconds"] = round(time.perf_counter() - started, 3)
    write_report(args.report, report)
    print(table(report))
    return 1 if any(p["status"] == "failed" for p in parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
