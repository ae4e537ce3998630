"""Executables own their device: inputs from anywhere are moved there, every output and cache
tensor is there, collectives refuse a tensor from elsewhere, and a device this machine
lacks is refused before anything starts.

On this CPU machine the device is "cpu"; the same assertions run on a GPU in
tools/gpu_check.py. What a CPU run can prove about NCCL: no tensor off the rank's
device ever reaches a collective (TorchDistributed checks each one, and the TP-2 runs
below go through that check), and commands travel as host pickles on the gloo group.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import glmc
from glmc.config import Mapping
from glmc.devices import check_device, parse_device, rank_device
from glmc.errors import GlmcError
from glmc.model.parallel import TorchDistributed

CPU = torch.device("cpu")


def _inputs(length: int = 6, batch: int = 2):
    # int32 ids and a non-contiguous mask: an executable must take them as they come.
    tokens = torch.arange(batch * length, dtype=torch.int32).reshape(batch, length) % 50
    positions = torch.arange(length, dtype=torch.int32).repeat(batch, 1)
    mask = (~torch.ones(length, length, dtype=torch.bool).tril()).T.T[None, None].expand(batch, 1, length, length)
    return tokens, positions, mask


def _assert_on(executable, logits, cache, device: torch.device, what: str):
    assert executable.device == device, what
    assert logits.device == device, f"{what}: logits on {logits.device}"
    tensors = executable.cache_tensors(cache)
    assert tensors and all(t.device == device for t in tensors), f"{what}: cache off {device}"


RUNS = [("torch", "checkpoint", 1), ("torch", "package", 1), ("onnxruntime", "package", 1),
        ("torch", "package", 2), ("onnxruntime", "package", 2)]


@pytest.mark.parametrize("backend,source,tp", RUNS, ids=[f"{b}-{s}-tp{t}" for b, s, t in RUNS])
def test_every_output_and_cache_is_on_the_executables_device(backend, source, tp, tiny_checkpoint, tiny_package,
                                                             tiny_package_tp2):
    path = {("checkpoint", 1): tiny_checkpoint, ("package", 1): tiny_package,
            ("package", 2): tiny_package_tp2}[source, tp]
    with glmc.load(path, backend=backend, tp_size=tp) as model:
        executable = model.executable
        tokens, positions, mask = _inputs()
        logits, cache = executable.prefill(tokens, positions, mask)
        _assert_on(executable, logits, cache, CPU, "prefill")
        step = torch.tensor([[7], [8]], dtype=torch.int32)
        logits, cache = executable.decode(step, torch.tensor([[6], [6]]), torch.zeros(2, 1, 1, 7, dtype=torch.bool),
                                          cache)
        _assert_on(executable, logits, cache, CPU, "decode")
        assert executable.cache_length(cache) == 7
        cache = executable.reorder_cache(cache, torch.tensor([1, 1], dtype=torch.int32))
        rows = executable.cache_tensors(cache)
        assert all(t.device == CPU for t in rows) and torch.equal(rows[0][0], rows[0][1])
        full, _ = model.logits(tokens, positions, mask)
        assert full.device == CPU and full.shape == (2, 6, model.config.vocab_size)


def test_a_collective_refuses_a_tensor_from_another_device():
    """What would reach NCCL from the host is refused before any collective runs (no process
    group is needed to show it: the check comes first)."""
    gpu_group = TorchDistributed(Mapping(2, 0), group=None, device="cuda:0")
    with pytest.raises(GlmcError, match=r"rank 0: a tensor on cpu reached the all-reduce of a group on cuda:0"):
        gpu_group.all_reduce(torch.ones(3))
    with pytest.raises(GlmcError, match=r"reached the all-gather of a group on cuda:0"):
        gpu_group.all_gather_last(torch.ones(3))
    host_group = TorchDistributed(Mapping(2, 1), group=None, device="cpu")
    with pytest.raises(GlmcError, match=r"rank 1: a tensor on meta reached the all-reduce of a group on cpu"):
        host_group.all_reduce(torch.ones(3, device="meta"))


def test_device_names():
    assert parse_device("cpu") == ("cpu", None) and parse_device("cuda:3") == ("cuda", 3)
    assert rank_device("cuda", 3) == "cuda:3" and rank_device("cpu", 3) == "cpu"
    for bad in ("gpu", "cuda:x", "cpu:1", "", "cuda:-1"):
        with pytest.raises(GlmcError, match="expected cpu, cuda or cuda:N"):
            parse_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_where_there_is_none():
    with pytest.raises(GlmcError, match=r"--device cuda: no CUDA device is available to PyTorch"):
        check_device("cuda")


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    # The count logic, on a machine that claims one GPU (this one has none to test with).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda", 1)
    with pytest.raises(GlmcError, match=r"--tp 4 needs 4 GPUs, this machine has 1"):
        check_device("cuda", 4)
    with pytest.raises(GlmcError, match=r"--device cuda:1: this machine has 1 GPU"):
        check_device("cuda:1")
    with pytest.raises(GlmcError, match=r"names one GPU; --tp 2 puts rank r on cuda:r"):
        check_device("cuda:0", 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("extra", [[], ["--backend", "onnxruntime"], ["--tp", "4"]], ids=["torch", "ort", "tp4"])
def test_glmc_run_on_a_missing_gpu_is_one_line_and_starts_nothing(tmp_path, extra):
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "glmc", "run", "--device", "cuda", "--cache-dir", str(cache),
                             "--no-output-files", *extra, "Hello [MASK]"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmc: error: --device cuda: no CUDA device"), result.stderr
    assert not cache.exists()  # nothing exported
