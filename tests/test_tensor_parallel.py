"""Tensor parallelism on CPU with gloo: ranks in real worker processes, against TP 1."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch

import glmc
from conftest import TINY_SPECIAL as S
from glmc.api import export
from glmc.errors import GlmcError
from glmc.generation.strategies import BaseStrategy, BeamSearchStrategy
from tolerances import assert_close

PROMPTS = [[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, S.mask, 23, 24], [31, S.gmask], [41, 42, S.smask, 43, 44, 45]]


@pytest.fixture(scope="module")
def packages(tiny_checkpoint, tiny_package, tmp_path_factory):
    # Exported in two processes: tracing runs on one core, and 14 ranks are traced here.
    root = tmp_path_factory.mktemp("tp")
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {tp: pool.submit(export, tiny_checkpoint, root / f"tp{tp}", tp_size=tp) for tp in (8, 4, 2)}
        return {1: tiny_package, **{tp: future.result() for tp, future in futures.items()}}


@pytest.fixture(scope="module")
def reference(tiny_package):
    """TP 1 on the torch backend: what every other run must reproduce."""
    model = glmc.load(tiny_package)
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    positions = torch.arange(8)[None]
    mask = ~torch.ones(8, 8, dtype=torch.bool).tril()
    mask[:, :4] = False
    logits, _ = model.logits(tokens, positions, mask[None, None])
    return {
        "logits": logits,
        "greedy": [r.token_ids for r in model.generate(PROMPTS, BaseStrategy(top_k=1), out_seq_length=20)],
        "beam": [(r.token_ids, r.scores) for r in model.generate(
            PROMPTS[1:3], BeamSearchStrategy(3, 1.0, no_repeat_ngram_size=2), out_seq_length=18)],
        "inputs": (tokens, positions, mask[None, None]),
    }


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_tp_runs_equal_tp1(packages, reference, tp, backend):
    with glmc.load(packages[tp], backend=backend, tp_size=tp) as model:
        logits, _ = model.logits(*reference["inputs"])
        assert_close(logits, reference["logits"], "float32", f"TP {tp} {backend} logits")
        greedy = model.generate(PROMPTS, BaseStrategy(top_k=1), out_seq_length=20)  # a padded batch
        assert [r.token_ids for r in greedy] == reference["greedy"]
        beams = model.generate(PROMPTS[1:3], BeamSearchStrategy(3, 1.0, no_repeat_ngram_size=2), out_seq_length=18)
        for result, (ids, scores) in zip(beams, reference["beam"]):
            assert result.token_ids == ids and np.allclose(result.scores, scores, atol=1e-4)
        assert model.cluster.workers and all(p.poll() is None for p in model.cluster.workers.values())
        workers = list(model.cluster.workers.values())
    assert all(p.poll() is not None for p in workers)  # closing stops every rank
    assert not _watchers()


def _watchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "glmc-rank-watcher"]


def test_a_failed_run_leaves_no_thread_behind(packages):
    # A thread still running at interpreter exit is ended inside its current C++ call, and a
    # watcher freeing the last reference to a tensor there aborts rank 0 after a clean report.
    model = glmc.load(packages[2], backend="torch", tp_size=2)
    worker = model.cluster.workers[1]
    worker.kill()
    worker.wait()
    with pytest.raises(GlmcError, match="rank 1 was killed by SIGKILL"):
        model.generate(PROMPTS, BaseStrategy(top_k=1), out_seq_length=20)
    model.close()
    assert not _watchers()


def test_a_tp2_model_serves_several_threads(packages, reference):
    # One call at a time: threads interleaving their broadcasts would garble the other rank's commands.
    # Half the threads go through the model (serialised per generation), half straight to its
    # executable, as the evaluation's scoring does (serialised per call).
    from glmc.generation.filling import generate

    with glmc.load(packages[2], backend="onnxruntime", tp_size=2) as model:
        results, errors = {}, []
        inputs = [model.prompt(p) for p in PROMPTS]

        def work(index: int) -> None:
            try:
                for _ in range(3):
                    if index % 2:
                        results[index] = [r.token_ids for r in model.generate(PROMPTS, BaseStrategy(top_k=1),
                                                                              out_seq_length=20)]
                    else:
                        beams = generate(model.executable, [_blank(p) for p in inputs], BaseStrategy(top_k=1), S)
                        results[index] = [beam[0].tokens for beam in beams]
            except Exception as error:  # noqa: BLE001 (reported below)
                errors.append(error)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors
        alone = [beam[0].tokens for beam in generate(model.executable, [_blank(p) for p in inputs],
                                                     BaseStrategy(top_k=1), S)]
        assert all(results[i] == reference["greedy"] for i in (1, 3))
        assert all(results[i] == alone for i in (0, 2))


def _blank(prompt):
    """The first blank of a prompt as generate() takes it (20 positions in all, as above)."""
    from glmc.generation.filling import BlankRequest

    context = prompt.ids + [S.sop]
    return BlankRequest(context, context.index(prompt.mask_id), prompt.gmask, 20 - len(context)).generation_input()


def test_checkpoint_is_resharded_on_the_fly(tiny_checkpoint, reference):
    with glmc.load(tiny_checkpoint, backend="torch", tp_size=4) as model:
        greedy = model.generate(PROMPTS, BaseStrategy(top_k=1), out_seq_length=20)
    assert [r.token_ids for r in greedy] == reference["greedy"]


def _cli_tokens(*args, launcher=()):
    result = subprocess.run([*launcher, "-m", "glmc", "run", *args, "--json", "--no-output-files", "--top-k", "1",
                             "--token-ids", "--out-seq-length", "20", "1 2 3 [MASK] 4", "5 6 7"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line)["token_ids"] for line in result.stdout.splitlines() if line.startswith("{")]


def test_torchrun_two_ranks(packages):
    single = _cli_tokens("--package", str(packages[1]), "--backend", "onnxruntime", launcher=(sys.executable,))
    assert len(single) == 2
    for backend in ("onnxruntime", "torch"):
        torchrun = _cli_tokens("--package", str(packages[2]), "--backend", backend,
                               launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"))
        assert torchrun == single, backend
    spawned = _cli_tokens("--package", str(packages[2]), "--backend", "onnxruntime", "--tp", "2",
                          launcher=(sys.executable,))
    assert spawned == single


# --- failures -------------------------------------------------------------------------------

def _long_run(tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i} is about [MASK] things\n" for i in range(200)), encoding="utf-8")
    return subprocess.Popen([sys.executable, "-m", "glmc", "run", "--tp", "2", "--input-source", str(prompts),
                             "--no-output-files", "--json", "--top-k", "1", "--out-seq-length", "100",
                             "--min-gen-length", "80", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)


def _default_sigint() -> None:
    # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT:
    # the run must react to Ctrl-C however the tests were started.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def _wait_for_generation(leader: subprocess.Popen) -> list[int]:
    """Block until rank 0 has printed one result (the ranks are generating); return the workers."""
    line = leader.stdout.readline()
    assert line.startswith("{"), leader.stderr.read()
    workers = _children(leader.pid)
    assert workers
    return workers


def _finish(leader: subprocess.Popen, started: float, workers: list[int], limit: float = 30.0) -> str:
    try:
        _, stderr = leader.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(leader.pid, signal.SIGKILL)
        pytest.fail("the run did not end within the limit")
    elapsed = time.monotonic() - started
    assert elapsed < limit, elapsed
    deadline = time.monotonic() + 5
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "a worker outlived the run"
    return stderr


def test_a_killed_worker_stops_the_run_and_is_named(tmp_path):
    leader = _long_run(tmp_path)
    workers = _wait_for_generation(leader)
    os.kill(workers[0], signal.SIGKILL)
    stderr = _finish(leader, time.monotonic(), workers)
    assert leader.returncode == 1
    assert "rank 1 was killed by SIGKILL" in stderr and "Traceback" not in stderr


def test_a_hung_worker_times_out_and_is_named(tmp_path):
    leader = _long_run(tmp_path, "--collective-timeout", "3")
    workers = _wait_for_generation(leader)
    os.kill(workers[0], signal.SIGSTOP)
    stderr = _finish(leader, time.monotonic(), workers)
    assert leader.returncode == 1 and "rank 1 is stopped and does not answer" in stderr, stderr


def test_ctrl_c_ends_every_rank(tmp_path):
    leader = _long_run(tmp_path)
    workers = _wait_for_generation(leader)
    os.killpg(leader.pid, signal.SIGINT)  # what a terminal sends to the foreground process group
    _finish(leader, time.monotonic(), workers)
    assert leader.returncode == 130


@pytest.mark.parametrize("delay", [0.3, 0.6, 0.9, 1.2])  # where in a step the signal lands
def test_ctrl_c_to_rank_0_alone_does_not_wait_for_the_collective_timeout(tmp_path, delay):
    # Interrupted between two all-reduces of a step, rank 0 leaves rank 1 inside a collective
    # that no stop command reaches: rank 1 must be terminated, not awaited for 60 s.
    leader = _long_run(tmp_path, "--collective-timeout", "60")
    workers = _wait_for_generation(leader)
    time.sleep(delay)
    os.kill(leader.pid, signal.SIGINT)
    _finish(leader, time.monotonic(), workers)
    assert leader.returncode == 130


def _first_child(pid: int, limit: float = 60.0) -> int:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        children = _children(pid)
        if children:
            return children[0]
        time.sleep(0.01)
    pytest.fail("no worker was started")


def test_a_rank_stopped_while_starting_ends_the_run_and_is_named(tmp_path):
    # Before, rank 0 waited for it in a barrier with no time limit, deaf to Ctrl-C.
    leader = _long_run(tmp_path)
    worker = _first_child(leader.pid)
    os.kill(worker, signal.SIGSTOP)
    stderr = _finish(leader, time.monotonic(), [worker])
    assert leader.returncode == 1 and "rank 1 is stopped and does not answer" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


def test_ctrl_c_while_the_ranks_start_ends_every_rank_at_once(tmp_path):
    leader = _long_run(tmp_path)
    worker = _first_child(leader.pid)
    os.kill(worker, signal.SIGSTOP)  # rank 0 would wait for it...
    os.kill(leader.pid, signal.SIGINT)  # ... but Ctrl-C comes first
    _finish(leader, time.monotonic(), [worker], limit=3.0)
    assert leader.returncode in (130, 1)  # interrupted, or the stopped rank was reported first


def _rank_of(pid: int) -> int | None:
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


def test_under_torchrun_a_silent_rank_is_named_after_the_timeout(tmp_path, packages):
    # No process handles here (torchrun started the ranks): the heartbeat in the store tells.
    leader = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "glmc",
                               "run", "--package", str(packages[2]), "--backend", "onnxruntime", "--no-output-files",
                               "--collective-timeout", "3", "--token-ids", "1 2 [MASK]"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, rank1 = time.monotonic() + 60, None
    while rank1 is None and time.monotonic() < deadline:
        rank1 = next((c for c in _children(leader.pid) if _rank_of(c) == 1), None)
        time.sleep(0.01)
    assert rank1 is not None
    os.kill(rank1, signal.SIGSTOP)
    try:
        _, stderr = leader.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
    assert "rank 1 showed no sign of life for 3 s" in stderr, stderr[-2000:]


def test_a_dead_rank_0_takes_its_workers_along(tmp_path):
    leader = _long_run(tmp_path)
    workers = _wait_for_generation(leader)
    os.kill(leader.pid, signal.SIGKILL)
    leader.wait(timeout=10)
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)


# --- refusals -------------------------------------------------------------------------------

def test_package_of_another_degree_is_refused(packages):
    with pytest.raises(GlmcError, match=r"exported for TP 2, asked to run at TP 4"):
        glmc.load(packages[2], backend="onnxruntime", tp_size=4)


RESHARD_EXPORT_PEAK = """
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


@pytest.mark.slow
def test_exporting_tp2_from_a_tp8_checkpoint_streams(tmp_path):
    from glmc.checkpoint import SatCheckpoint, convert_checkpoint, model_state, save_checkpoint
    from glmc.config import PRESETS
    from glmc.model import GLMModel

    model = GLMModel(PRESETS["glm-bench"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_checkpoint(tmp_path / "tp1", model.config, [model_state(model)])
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    convert_checkpoint(SatCheckpoint.open(tmp_path / "tp1"), tmp_path / "tp8", 8)
    result = subprocess.run([sys.executable, "-c", RESHARD_EXPORT_PEAK, str(tmp_path / "tp8"), str(tmp_path / "pkg"),
                             "2"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    usage = json.loads(result.stdout.strip().splitlines()[-1])
    growth = usage["peak"] - usage["before"]
    rank_bytes = model_bytes / 2
    print(f"glm-bench TP 8 -> TP 2 package: target rank {rank_bytes / 2**20:.0f} MiB, "
          f"peak growth {growth / 2**20:.0f} MiB (whole model {model_bytes / 2**20:.0f} MiB)")
    # One target rank plus the tracer's and the writer's fixed working memory, well below the model.
    assert growth < rank_bytes + 400 * 2**20
    assert growth < 0.85 * model_bytes
