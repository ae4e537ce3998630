"""`glmc train`: the objective's samples, the stability tricks, overfitting, exact resumption."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TINY_SPECIAL as S
from glmc.api import EMBEDDED_DEFAULT
from glmc.config import GLMConfig
from glmc.generation.filling import blank_attention_mask
from glmc.model import GLMModel
from glmc.tokenizer import IceTokenizer
from glmc.train import TrainOptions, collate, deepnorm_init_, gmask_sample, mask_sample, train
from glmc.train.objective import IGNORE, attention_mask, window_length
from glmc.train.trainer import learning_rate

WINDOW = list(range(100, 160))  # 60 distinct "tokens"


@pytest.mark.parametrize("seed", range(5))
def test_mask_samples_follow_the_blank_rules(seed):
    sample = mask_sample(WINDOW, S, np.random.default_rng(seed))
    ctx = sample.context_length
    part_a = sample.tokens[:ctx]
    assert part_a[-1] == S.eos and part_a.count(S.mask) >= 1
    assert sample.positions[:ctx] == list(range(ctx))  # Part A counts up
    assert all(t == IGNORE for t in sample.targets[:ctx])
    spans, i = [], ctx
    while i < len(sample.tokens):  # Part B: sop + span, all at the mask's position; targets span + eop
        assert sample.tokens[i] == S.sop
        j = sample.tokens.index(S.sop, i + 1) if S.sop in sample.tokens[i + 1:] else len(sample.tokens)
        span = sample.tokens[i + 1:j]
        assert sample.targets[i:j] == span + [S.eop]
        assert len(set(sample.positions[i:j])) == 1
        spans.append((sample.positions[i], span))
        i = j
    mask_positions = [k for k, t in enumerate(part_a) if t == S.mask]
    assert [p for p, _ in spans] == mask_positions  # left to right, one span per mask
    rebuilt, spans_left = [], list(spans)
    for token in part_a[:-1]:
        rebuilt += spans_left.pop(0)[1] if token == S.mask else [token]
    assert rebuilt == WINDOW  # filling the blanks gives the window back
    masked = sum(len(span) for _, span in spans)
    assert masked == round(0.15 * len(WINDOW))


@pytest.mark.parametrize("seed", range(3))
def test_gmask_samples_continue_the_prefix(seed):
    sample = gmask_sample(WINDOW, S, np.random.default_rng(seed))
    ctx = sample.context_length
    assert sample.tokens[ctx - 1] == S.gmask and sample.tokens[ctx] == S.sop
    assert sample.tokens[:ctx - 1] + sample.tokens[ctx + 1:] == WINDOW
    assert sample.positions == list(range(len(sample.tokens)))  # counting on, as generate.py for [gMASK]
    assert sample.targets == [IGNORE] * ctx + WINDOW[ctx - 1:] + [S.eop]


def test_the_training_mask_is_the_inference_mask():
    sample = gmask_sample(WINDOW, S, np.random.default_rng(0))
    n = len(sample.tokens)
    # generate.py's mask for a context ending in sop (Part A + sop), over the whole sample.
    assert torch.equal(attention_mask(sample, n), blank_attention_mask(sample.context_length + 1, n))


def test_samples_fit_their_window_budget():
    rng = np.random.default_rng(0)
    for seq_len in (32, 64, 256):
        n = window_length(seq_len)
        for _ in range(50):
            window = list(range(1000, 1000 + n))
            assert len(mask_sample(window, S, rng).tokens) <= seq_len
            assert len(gmask_sample(window, S, rng).tokens) <= seq_len
    batch = collate([gmask_sample(WINDOW, S, rng)], 80, pad_id=S.eos)
    assert batch["tokens"].shape == (1, 80) and (batch["targets"][0, 62:] == IGNORE).all()


def test_deepnorm_init_scales():
    config = GLMConfig(num_layers=8, hidden_size=64, num_attention_heads=4, inner_hidden_size=256,
                       vocab_size=128, max_sequence_length=32)
    model = deepnorm_init_(GLMModel(config), seed=0)
    beta = 16 ** -0.5
    xavier = lambda w: (2.0 / sum(w.shape)) ** 0.5  # noqa: E731
    h_to_4h = model.layers[3].mlp.dense_h_to_4h.weight
    assert h_to_4h.std().item() == pytest.approx(beta * xavier(h_to_4h), rel=0.05)
    qkv = model.layers[3].attention.query_key_value.weight.view(4, 3, 16, 64)  # heads, q/k/v, hd, in
    assert qkv[:, 0].std().item() == pytest.approx(xavier(model.layers[3].attention.query_key_value.weight), rel=0.05)
    assert qkv[:, 2].std().item() == pytest.approx(beta * qkv[:, 0].std().item(), rel=0.1)
    assert torch.equal(model.layers[0].input_layernorm.weight, torch.ones(64))


def test_learning_rate_schedule():
    options = TrainOptions(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, options) == pytest.approx(0.1) and learning_rate(9, options) == pytest.approx(1.0)
    assert learning_rate(10, options) == pytest.approx(1.0)
    assert learning_rate(55, options) == pytest.approx(0.55)
    assert learning_rate(100, options) == pytest.approx(0.1)


# --- whole runs on a tiny model -------------------------------------------------------------

TINY = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=128, vocab_size=8192,
                 max_sequence_length=64)


@pytest.fixture(scope="module")
def tokenizer():
    return IceTokenizer(EMBEDDED_DEFAULT / "ice_text.model", text_offset=0)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    records = ["The cat sat on the mat and looked at the moon.", "床前明月光，疑是地上霜。", "A stitch in time saves nine."]
    path.write_text("".join(r + "\n%\n" for r in records * 20), encoding="utf-8")
    return path


def test_a_tiny_model_overfits_a_tiny_corpus(tokenizer, tiny_corpus, tmp_path):
    options = TrainOptions(steps=120, batch_size=8, seq_len=48, lr=3e-3, seed=0)
    result = train(TINY, tokenizer, [tiny_corpus], tmp_path / "ckpt", options)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert first > 8.0 and last < 2.5, (first, last)
    assert result.heldout_loss < 2.5  # the held-out records repeat the training ones here


def test_stop_and_resume_gives_the_same_losses(tokenizer, tiny_corpus, tmp_path):
    options = TrainOptions(steps=12, batch_size=4, seq_len=48, lr=3e-3, seed=3, save_interval=5)
    straight = train(TINY, tokenizer, [tiny_corpus], tmp_path / "straight", options)

    def interrupt(step, loss, tokens_per_second):  # Ctrl-C during step 7: the checkpoint of step 5 remains
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TINY, tokenizer, [tiny_corpus], tmp_path / "resumed", options, progress=interrupt)
    assert (tmp_path / "resumed" / "latest").read_text() == "5"
    resumed = train(TINY, tokenizer, [tiny_corpus], tmp_path / "resumed", options, resume=True)
    assert resumed.losses == straight.losses
    assert (tmp_path / "resumed" / "latest").read_text() == "12"
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["12", "ice_text.model", "latest",
                                                                        "model_config.json"]


def test_cli_train_and_refusals(tiny_corpus, tmp_path):
    out = tmp_path / "ckpt"
    args = [sys.executable, "-m", "glmc", "train", "--config", "glm-demo", "--data", str(tiny_corpus), "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--out", str(out), "--json", "--no-progress"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 1 and "already holds files; pass --resume" in again.stderr
    missing = subprocess.run([sys.executable, "-m", "glmc", "train", "--data", "/no/such/corpus.txt", "--steps", "2",
                              "--out", str(tmp_path / "x"), "--no-progress"], capture_output=True, text=True)
    assert missing.returncode == 1 and "/no/such/corpus.txt" in missing.stderr
    assert "Traceback" not in missing.stderr
