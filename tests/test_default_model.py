"""The embedded default model: trained by `glmc train`, shipped in fp16, and it reads."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

import glmc
from glmc.api import EMBEDDED_DEFAULT
from glmc.checkpoint import SatCheckpoint, load_model
from glmc.model import GLMModel
from glmc.tokenizer import IceTokenizer
from glmc.train import TrainOptions, deepnorm_init_
from glmc.train.data import Corpus
from glmc.train.trainer import heldout_loss

REPO = Path(__file__).resolve().parents[1]
README_LOSSES = re.compile(r"Held-out loss of the shipped model: ([0-9.]+) per target token "
                           r"\(an untrained model: ([0-9.]+)\)")


def test_heldout_loss_is_far_below_an_untrained_models_and_matches_the_readme():
    found = README_LOSSES.search((REPO / "README.md").read_text(encoding="utf-8"))
    assert found, "README.md must state the shipped model's held-out loss"
    readme_shipped, readme_untrained = map(float, found.groups())
    tokenizer = IceTokenizer(EMBEDDED_DEFAULT / "ice_text.model", text_offset=0)
    corpus = Corpus.build([REPO / "data/corpus/en.txt", REPO / "data/corpus/zh.txt"], tokenizer)
    options = TrainOptions(steps=1)  # the held-out windows and blanks glmc train reports on
    ckpt = SatCheckpoint.open(EMBEDDED_DEFAULT)
    shipped = heldout_loss(load_model(ckpt, dtype=torch.float32), corpus, tokenizer, options, "cpu")
    untrained = heldout_loss(deepnorm_init_(GLMModel(ckpt.config), options.seed), corpus, tokenizer, options, "cpu")
    assert shipped == pytest.approx(readme_shipped, abs=2e-3)
    assert untrained == pytest.approx(readme_untrained, abs=2e-3)
    assert shipped < untrained - 2.0  # more than e^2 = 7.4 times likelier per token


def test_shipped_in_fp16_computed_in_float32_on_cpu():
    ckpt = SatCheckpoint.open(EMBEDDED_DEFAULT)
    assert ckpt.info.float_dtype == torch.float16
    assert "trained by glmc train" in ckpt.metadata["description"]
    assert next(glmc.load().executable.model.parameters()).dtype == torch.float32
    assert next(glmc.load(dtype="float16").executable.model.parameters()).dtype == torch.float16


def _readme_main_command() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("Run the main job", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return shlex.split(block.strip())


def _is_cjk(char: str) -> bool:
    return unicodedata.name(char, "").startswith("CJK UNIFIED IDEOGRAPH")


def test_the_readme_main_command_fills_blanks_in_each_prompts_language():
    # Random weights write a mixture of scripts ("--时 you楼"); the trained model keeps to
    # the prompt's language, and a [gMASK] continues it for more than a word.
    command = _readme_main_command()
    assert command[:2] == ["glmc", "run"], command
    result = subprocess.run([sys.executable, "-m", "glmc", *command[1:], "--json"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    seen = set()
    for output in outputs:
        chinese = any(map(_is_cjk, output["input"]))
        accept = _is_cjk if chinese else str.isascii
        letters = [c for c in output["blanks"][0][0] if c.isalpha()]
        assert len(letters) >= (5 if "[gMASK]" in output["input"] else 1), output
        assert sum(map(accept, letters)) >= 0.9 * len(letters), output
        seen.add(("zh" if chinese else "en", "[gMASK]" if "[gMASK]" in output["input"] else "[MASK]"))
    assert seen == {(language, mask) for language in ("en", "zh") for mask in ("[MASK]", "[gMASK]")}
