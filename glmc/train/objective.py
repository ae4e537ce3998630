"""GLM's autoregressive blank infilling, as GLM-130B trains it (and as inference reads it).

A sample is built from a window of tokens in one of two ways:

* `[MASK]` (short blanks, ~30% of samples): spans with Poisson(3) lengths cover
  ~15% of the window; each span is replaced by one `[MASK]` in the corrupted
  context (Part A, followed by `eos`, as generate.py appends it); then, left to
  right, each span is `sop + span` with targets `span + eop` (Part B), every token
  of a span at its mask's position.
* `[gMASK]` (long continuation, ~70%): the window is cut at a random point; Part A
  is the prefix + `[gMASK]`, Part B is `sop + suffix` with targets `suffix + eop`,
  positions counting on.

Part A attends bidirectionally; Part B is causal (and sees all of Part A). These
are exactly the masks and 1-D positions of glmc.generation, so a trained model
fills blanks through `glmc run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glmc.tokenizer.special import SpecialTokens

IGNORE = -100  # target of positions without a loss (Part A, padding)
MASK_SAMPLES = 0.3  # share of [MASK] samples; the rest are [gMASK]
MASK_RATIO = 0.15  # share of a [MASK] sample's tokens in blanks
MEAN_SPAN = 3.0  # Poisson lambda of [MASK] span lengths


@dataclass
class Sample:
    tokens: list[int]  # Part A then Part B
    positions: list[int]
    targets: list[int]  # the next token of Part B; IGNORE elsewhere
    context_length: int  # Part A: attended bidirectionally


def mask_sample(window: list[int], special: SpecialTokens, rng: np.random.Generator) -> Sample:
    """Short blanks: Poisson(3) spans covering ~15% of the window, each a [MASK] in Part A."""
    n = len(window)
    budget = max(1, round(MASK_RATIO * n))
    lengths = []
    while sum(lengths) < budget:
        lengths.append(max(1, int(rng.poisson(MEAN_SPAN))))
    lengths[-1] -= sum(lengths) - budget
    lengths = [length for length in lengths if length > 0]
    # Spread the unmasked tokens over the k + 1 gaps around the spans, in order.
    gaps = rng.multinomial(n - budget, [1.0 / (len(lengths) + 1)] * (len(lengths) + 1))
    part_a, spans, mask_positions, cursor = [], [], [], 0
    for gap, length in zip(gaps, lengths):
        part_a += window[cursor:cursor + gap]
        cursor += gap
        mask_positions.append(len(part_a))
        part_a.append(special.mask)
        spans.append(window[cursor:cursor + length])
        cursor += length
    part_a += window[cursor:] + [special.eos]
    tokens, positions = list(part_a), list(range(len(part_a)))
    targets = [IGNORE] * len(part_a)
    for span, position in zip(spans, mask_positions):
        tokens += [special.sop] + span
        positions += [position] * (len(span) + 1)
        targets += span + [special.eop]
    return Sample(tokens, positions, targets, len(part_a))


def gmask_sample(window: list[int], special: SpecialTokens, rng: np.random.Generator) -> Sample:
    """A long continuation: prefix + [gMASK], then sop + the rest, positions counting on."""
    cut = int(rng.integers(1, len(window)))
    part_a = window[:cut] + [special.gmask]
    suffix = window[cut:]
    tokens = part_a + [special.sop] + suffix
    targets = [IGNORE] * len(part_a) + suffix + [special.eop]
    return Sample(tokens, list(range(len(tokens))), targets, len(part_a))


def make_sample(window: list[int], special: SpecialTokens, rng: np.random.Generator) -> Sample:
    if rng.random() < MASK_SAMPLES:
        return mask_sample(window, special, rng)
    return gmask_sample(window, special, rng)


def window_length(seq_len: int) -> int:
    """Raw tokens per window so that any sample fits `seq_len`: a [MASK] sample grows by
    two tokens per span plus eos, spans being at least one token (at most 15% + 1 of them)."""
    n = seq_len - 2
    while n + 2 * (round(MASK_RATIO * n) + 1) + 1 > seq_len:
        n -= 1
    return n


def attention_mask(sample: Sample, length: int) -> torch.Tensor:
    """[length, length] bool, True = masked: Part A sees Part A; Part B sees Part A and itself causally."""
    ctx = sample.context_length
    visible = torch.ones(length, length, dtype=torch.bool).tril()
    visible[:, :ctx] = True
    visible[:ctx, ctx:] = False
    return ~visible


def collate(samples: list[Sample], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to `seq_len`: padding comes after every real token, so no real row sees it."""
    batch = len(samples)
    tokens = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    positions = torch.zeros(batch, seq_len, dtype=torch.long)
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros(batch, 1, seq_len, seq_len, dtype=torch.bool)
    for row, sample in enumerate(samples):
        n = len(sample.tokens)
        if n > seq_len:
            raise ValueError(f"a sample of {n} tokens does not fit seq_len {seq_len}")
        tokens[row, :n] = torch.tensor(sample.tokens)
        positions[row, :n] = torch.tensor(sample.positions)
        targets[row, :n] = torch.tensor(sample.targets)
        mask[row, 0] = attention_mask(sample, seq_len)
    return {"tokens": tokens, "positions": positions, "targets": targets, "mask": mask}
