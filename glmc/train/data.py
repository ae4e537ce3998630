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
from glmc.tokenizer import IceTokenizer

_FORTUNE_SEPARATOR = re.compile(r"^%\s*$", re.M)


def read_records(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise GlmcError(f"--data {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise GlmcError(f"--data {path}: not UTF-8 text") from None
    parts = _FORTUNE_SEPARATOR.split(text) if _FORTUNE_SEPARATOR.search(text) else re.split(r"\n\s*\n", text)
    return [p.strip() for p in parts if p.strip()]


@dataclass
class Corpus:
    train: np.ndarray  # token stream of the training records, each followed by eos
    heldout: np.ndarray
    records: int

    @classmethod
    def build(cls, files: list[Path], tokenizer: IceTokenizer, heldout_every: int = 20) -> "Corpus":
        train, heldout, count = [], [], 0
        for path in files:
            for record in read_records(Path(path)):
                ids = tokenizer.tokenize(record) + [tokenizer.special.eos]
                (heldout if count % heldout_every == 0 else train).extend(ids)
                count += 1
        if not train:
            raise GlmcError(f"--data: no text in {', '.join(map(str, files))}")
        return cls(np.asarray(train, dtype=np.int64), np.asarray(heldout, dtype=np.int64), count)


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
