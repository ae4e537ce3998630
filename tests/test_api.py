"""The Python API that library users (and later backends) rely on."""

from __future__ import annotations

import pytest
import torch

import glmc
from glmc.errors import GlmcError
from tolerances import assert_close


@pytest.fixture(scope="module")
def default_model():
    return glmc.load()


def test_logits_with_and_without_cache(default_model):
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    positions = torch.arange(8)[None]
    mask = ~torch.ones(8, 8, dtype=torch.bool).tril()
    full, cache = default_model.logits(tokens, positions, mask[None, None])
    assert full.shape == (1, 8, default_model.config.vocab_size)
    head, cache = default_model.logits(tokens[:, :5], positions[:, :5], mask[:5, :5])
    tail, cache = default_model.logits(tokens[:, 5:], positions[:, 5:], mask[5:, :], cache)
    assert_close(torch.cat([head, tail], 1), full, "float32", "prefill + cached continuation")


def test_logits_reject_sat_convention_violations(default_model):
    tokens, positions = [[1, 2, 3]], [[0, 1, 2]]
    with pytest.raises(GlmcError, match="must be boolean"):
        default_model.logits(tokens, positions, torch.zeros(1, 1, 3, 3))
    with pytest.raises(GlmcError, match=r"must end in \[3, 3\]"):
        default_model.logits(tokens, positions, torch.zeros(1, 1, 3, 4, dtype=torch.bool))
    with pytest.raises(GlmcError, match="position ids must lie in"):
        default_model.logits(tokens, [[0, 1, 999]], torch.zeros(3, 3, dtype=torch.bool))


def test_generate_from_text_and_from_ids_agree(default_model):
    text = default_model.generate("The moon is [MASK].", glmc.BaseStrategy(top_k=1), out_seq_length=24)
    ids = default_model.generate(default_model.prompt("The moon is [MASK].").ids, glmc.BaseStrategy(top_k=1),
                                 out_seq_length=24)
    assert text.token_ids == ids.token_ids
    assert text.answers[0].startswith("The moon is") and text.answers[0].endswith(".")
    assert text.styled(ansi=False).startswith("The moon is ")


def test_generate_a_list_returns_a_list(default_model):
    results = default_model.generate(["a [MASK] b", "c"], glmc.BaseStrategy(top_k=1), out_seq_length=16)
    assert isinstance(results, list) and len(results) == 2 and results[1].input_text == "c [gMASK]"


def test_dtype_option(default_model):
    half = glmc.load(dtype="bfloat16")
    logits, _ = half.logits([[1, 2, 3]], [[0, 1, 2]], torch.zeros(3, 3, dtype=torch.bool))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert next(half.executable.model.parameters()).dtype == torch.bfloat16
