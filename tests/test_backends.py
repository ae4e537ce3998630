"""Every backend against the reference model on the same inputs (glm-tiny, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import glmc
from conftest import TINY_SPECIAL as S
from glmc.generation.strategies import BaseStrategy, BeamSearchStrategy
from tolerances import assert_close

# (backend, source): the torch backend on the checkpoint and on the package, ONNX Runtime on the package.
RUNS = [("torch", "checkpoint"), ("torch", "package"), ("onnxruntime", "package"), ("onnxruntime", "unfused")]


@pytest.fixture(scope="module", params=RUNS, ids=lambda r: f"{r[0]}-{r[1]}")
def model(request, tiny_checkpoint, tiny_package, tiny_package_unfused):
    backend, source = request.param
    path = {"checkpoint": tiny_checkpoint, "package": tiny_package, "unfused": tiny_package_unfused}[source]
    return glmc.load(path, backend=backend)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return glmc.load(tiny_checkpoint, backend="torch")


def prompt(kind: str, length: int = 20, context: int = 12, batch: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, 1000, (batch, length)))
    positions = torch.arange(length).repeat(batch, 1)
    mask = ~torch.ones(length, length, dtype=torch.bool).tril()
    if kind != "causal":
        mask[:, : context - 1] = False
    if kind == "mask":
        positions[:, context - 1:] = 4
    return tokens, positions, mask[None, None].repeat(batch, 1, 1, 1)


@pytest.mark.parametrize("kind", ["gmask", "mask", "causal"])
def test_logits(model, tiny_model, kind):
    tokens, positions, mask = prompt(kind)
    logits, _ = model.logits(tokens, positions, mask)
    with torch.no_grad():
        expected = tiny_model(tokens, positions, mask).logits
    assert_close(logits, expected, "float32", f"{kind} logits")


def test_cached_decoding_over_8_steps(model, tiny_model):
    tokens, positions, mask = prompt("gmask", length=20, context=12)
    with torch.no_grad():
        expected = tiny_model(tokens, positions, mask).logits
    logits, cache = model.logits(tokens[:, :12], positions[:, :12], mask[..., :12, :12])
    steps = [logits[:, -1]]
    for i in range(12, 20):
        logits, cache = model.logits(tokens[:, i:i + 1], positions[:, i:i + 1], mask[..., i:i + 1, :i + 1], cache)
        steps.append(logits[:, -1])
    assert_close(torch.stack(steps[:-1], 1), expected[:, 11:19], "float32", "cached steps")


def test_padded_batch(model, tiny_model):
    tokens, positions, mask = prompt("gmask", length=16, context=10, batch=2, seed=3)
    short = 11
    padded_tokens, padded_positions, padded_mask = tokens.clone(), positions.clone(), mask.clone()
    pad = 16 - short  # row 1 holds a shorter prompt, left-padded and masked out
    padded_tokens[1, :pad] = 0
    padded_tokens[1, pad:] = tokens[1, :short]
    padded_positions[1, :pad] = 0
    padded_positions[1, pad:] = positions[1, :short]
    padded_mask[1] = True
    padded_mask[1, 0, pad:, pad:] = mask[1, 0, :short, :short]
    padded_mask[1, 0, :pad, pad:pad + 8] = False
    logits, _ = model.logits(padded_tokens, padded_positions, padded_mask)
    with torch.no_grad():
        alone = tiny_model(tokens[1:, :short], positions[1:, :short], mask[1:, :, :short, :short]).logits
    assert_close(logits[1, pad:], alone[0], "float32", "padded row")


PROMPTS = [[31, 32, 33, S.mask, 34, 35], [41, 42, S.gmask], [51, S.smask, 52, 53, 54, 55, 56]]


def test_greedy_generation_is_identical(model, reference):
    strategy = lambda: BaseStrategy(top_k=1)  # noqa: E731
    assert ([r.token_ids for r in model.generate(PROMPTS, strategy(), out_seq_length=30)]
            == [r.token_ids for r in reference.generate(PROMPTS, strategy(), out_seq_length=30)])


def test_beam_search_is_identical(model, reference):
    strategy = lambda: BeamSearchStrategy(3, 1.0, no_repeat_ngram_size=3, min_gen_length=2)  # noqa: E731
    got = model.generate(PROMPTS, strategy(), out_seq_length=24)
    expected = reference.generate(PROMPTS, strategy(), out_seq_length=24)
    for g, e in zip(got, expected):
        assert g.token_ids == e.token_ids
        assert np.allclose(g.scores, e.scores, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_option(tiny_package, tiny_model):
    model = glmc.load(tiny_package, backend="torch", torch_compile=True)
    tokens, positions, mask = prompt("gmask", length=10, context=6)
    logits, cache = model.logits(tokens, positions, mask)
    with torch.no_grad():
        expected = tiny_model(tokens, positions, mask).logits
    assert_close(logits, expected, "float32", "torch.compile logits")
