"""What a run costs beside the model's own arithmetic: resident memory, sampling, start-up.

- Resident memory: a glm-bench process after load and a few steps, as a multiple of the
  weight bytes (each weight should be resident once: targets 1.15x on ONNX Runtime, 1.1x
  on torch).
- Sampling: GLM-130B's default top-p sampling over glm-bench's 150,528-token vocabulary,
  as a share of a batch-1 decode step on ONNX Runtime (target: at most 3%), on logits
  peaked like a trained model's and on flat ones (where top-p needs SAT's full sort).
- Start-up: `glmc --help` (target 0.5 s) and one prompt of the README on the embedded
  model on torch (target 1.5 s), wall time of the whole command.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import interleaved, summary
from glmc import backends
from glmc.config import PRESETS
from glmc.generation.strategies import BaseStrategy
from glmc.model import GLMModel
from glmc.run_spec import RunSpec
from report import MemoryRecord, Record

RESIDENT = """
import json, sys, torch
from glmc.memory import rss_bytes
from glmc import backends
from glmc.run_spec import RunSpec
import glmc.backends.onnxruntime, glmc.backends.pytorch, glmc.graphs  # libraries are not the model
before = rss_bytes()
ex = backends.open_rank(RunSpec(source=sys.argv[1], backend=sys.argv[2]))
tokens = torch.randint(0, 1000, (1, 16))
causal = ~torch.ones(16, 16, dtype=torch.bool).tril()
_, cache = ex.prefill(tokens, torch.arange(16)[None], causal[None, None], capacity=32)
for i in range(8):
    _, cache = ex.decode(torch.tensor([[5 + i]]), torch.tensor([[16 + i]]), torch.zeros(1, 1, 1, 17 + i, dtype=torch.bool), cache)
print(json.dumps({"resident": rss_bytes() - before}))
"""


@pytest.mark.parametrize("backend,kind,target", [("onnxruntime", "onnxruntime", 1.15), ("torch", "checkpoint", 1.1),
                                                 ("torch", "onnxruntime", 1.1)],
                         ids=["onnxruntime", "torch-checkpoint", "torch-package"])
def test_resident_memory(sources, record, backend, kind, target):
    paths = sources("glm-bench")
    result = subprocess.run([sys.executable, "-c", RESIDENT, str(paths[kind]), backend], capture_output=True,
                            text=True, timeout=900, check=True)
    resident = json.loads(result.stdout.strip().splitlines()[-1])["resident"]
    weight_bytes = sum(p.numel() * p.element_size() for p in GLMModel(PRESETS["glm-bench"]).parameters())
    record(MemoryRecord("glm-bench", f"{backend} ({kind})", weight_bytes, resident, target))


def _logits(vocab: int, peaked: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if peaked:  # Zipf-like: the log-probability falls with the log of the rank, as language models' do
        ranks = torch.randperm(vocab, generator=generator).float() + 1
        return (-1.5 * ranks.log() + 0.3 * torch.randn(vocab, generator=generator)).view(1, 1, vocab)
    return torch.randn(1, 1, vocab, generator=generator)


def test_sampling_against_a_decode_step(sources, record):
    vocab = PRESETS["glm-bench"].vocab_size
    ex = backends.open_rank(RunSpec(source=str(sources("glm-bench")["onnxruntime"]), backend="onnxruntime"))
    zeros = torch.zeros(1, 1, dtype=torch.long)
    _, cache = ex.prefill(zeros, zeros, torch.zeros(1, 1, 1, 1, dtype=torch.bool), capacity=200)
    cache.length = 128

    def decode():
        ex.decode(torch.tensor([[7]]), torch.tensor([[128]]), torch.zeros(1, 1, 1, 129, dtype=torch.bool), cache)
        cache.length = 128

    strategy = BaseStrategy()  # GLM-130B's defaults: temperature 1, top-p 0.7
    calls = {"decode": decode}
    for shape in ("peaked", "flat"):
        logits = _logits(vocab, shape == "peaked")
        run = strategy.start(1, (20002,))
        calls[shape] = lambda logits=logits, run=run: (run.step(logits.clone(), [[[1]]]),
                                                       run.done.__setitem__(0, False))
    times = interleaved(calls, rounds=12)
    step, _, _ = summary(times["decode"])
    for shape in ("peaked", "flat"):
        median, low, high = summary(times[shape])
        record(Record(f"top-p sampling ({shape})", "glm-bench", "sampling", median, 1, 0.0, "-", low=low, high=high,
                      note=f"{median / step:.1%} of an onnxruntime decode step (b1 past128, {step * 1e3:.1f} ms)"))


COMMANDS = {"glmc --help": ["--help"],
            "glmc run (one prompt)": ["run", "--no-output-files", "Where there is a will, there is a [MASK]."]}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_start_up(record, name):
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "glmc", *COMMANDS[name]], capture_output=True, check=True, timeout=120)
        times.append(time.perf_counter() - start)
    median, low, high = summary(times)
    target = 0.5 if "help" in name else 1.5
    record(Record(name, "embedded", "torch", median, 1, 0.0, "-", low=low, high=high,
                  note=f"wall time of the command; target {target} s"))
