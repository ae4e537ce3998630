"""Training text: records read from corpus files, tokenized, split into train and held-out.

A corpus file holds records separated by lines with only `%` (the fortune format
of data/corpus), or, without such lines, paragraphs separated by blank lines.
Every `heldout_every`-th record is held out and never trained on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glmc.errors import GlmcError
from glmc.fileio import read_text
from glmc.tokenizer import IceTokenizer

_FORTUNE_SEPARATOR = re.compile(r"^%\s*$", re.M)
HELDOUT_EVERY = 20  # every 20th record is held out


def read_records(path: Path) -> list[str]:
    text = read_text(path, label="--data ")
    parts = _FORTUNE_SEPARATOR.split(text) if _FORTUNE_SEPARATOR.search(text) else re.split(r"\n\s*\n", text)
    return [p.strip() for p in parts if p.strip()]


@dataclass
class Corpus:
    train: np.ndarray  # token stream of the training records, each followed by eos
    heldout: np.ndarray
    records: int

    @classmethod
    def build(cls, files: list[Path], tokenizer: IceTokenizer, heldout_every: int = HELDOUT_EVERY) -> "Corpus":
        train, heldout, count = [], [], 0
        for path, record, is_heldout in split_records(files, heldout_every):
            ids = tokenizer.tokenize(record) + [tokenizer.special.eos]
            (heldout if is_heldout else train).extend(ids)
            count += 1
        if not train:
            raise GlmcError(f"--data: no text in {', '.join(map(str, files))}")
        return cls(np.asarray(train, dtype=np.int64), np.asarray(heldout, dtype=np.int64), count)


def split_records(files: list[Path], heldout_every: int = HELDOUT_EVERY) -> list[tuple[Path, str, bool]]:
    """(file, record, held out?) for every record of the files in order: every `heldout_every`-th
    record, counting across the files, is held out."""
    out = []
    for path in map(Path, files):
        for record in read_records(path):
            out.append((path, record, len(out) % heldout_every == 0))
    return out


class WindowSampler:
    """Random windows of a token stream, from a seeded generator whose state a checkpoint keeps."""

    def __init__(self, stream: np.ndarray, length: int, seed: int):
        if len(stream) <= length:
            raise GlmcError(f"the training text ({len(stream)} tokens) is shorter than one window ({length})")
        self.stream, self.length = stream, length
        self.rng = np.random.default_rng(seed)

    def window(self) -> list[int]:
        start = int(self.rng.integers(0, len(self.stream) - self.length))
        return self.stream[start:start + self.length].tolist()

    def state(self) -> str:
        return json.dumps(self.rng.bit_generator.state)

    def restore(self, state: str) -> None:
        self.rng.bit_generator.state = json.loads(state)


def heldout_windows(stream: np.ndarray, length: int) -> list[list[int]]:
    """Consecutive windows covering the held-out stream, for a deterministic evaluation."""
    return [stream[i:i + length].tolist() for i in range(0, len(stream) - length + 1, length)]
