"""Model inputs of the three task types, as GLM-130B's evaluation/dataset.py builds them.

Masks here are integer [n, n] with 1 = visible (dataset.py's convention); `pad_batch`
turns a list of samples into SAT's boolean [batch, 1, L, L] with True = masked,
L rounded up to a multiple of 32 as GLM-130B does.

Multiple choice, one sequence for all choices:

    text [MASK] | sop c0[:-1] | sop c1[:-1] | ...
    context (bidirectional) then one causal block per choice; every choice sees
    the context, no choice sees another. A choice's logits sit at its sop and its
    own tokens; its score is the sum of its tokens' log-probabilities. When every
    choice is one token, one sop serves them all (the single-token shortcut).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glmc.tokenizer.special import SpecialTokens

TILE = 32  # GLM-130B pads a batch to a multiple of this


def block_diagonal(*blocks: np.ndarray) -> np.ndarray:
    size = sum(b.shape[0] for b in blocks)
    out = np.zeros((size, size), dtype=np.int64)
    start = 0
    for block in blocks:
        n = block.shape[0]
        out[start:start + n, start:start + n] = block
        start += n
    return out


@dataclass
class MultiChoiceSample:
    tokens: np.ndarray  # [n]
    position_ids: np.ndarray  # [n]
    attention_mask: np.ndarray  # [n, n], 1 = visible
    choices: list[list[int]]
    choice_target_ids: list[np.ndarray]  # per choice, the indices whose logits predict its tokens
    is_single_token: bool


def multiple_choice_sample(text: list[int], choices: list[list[int]], special: SpecialTokens, *,
                           is_single_token: bool, use_task_mask: bool = False,
                           unified_multitask_encoding: bool = False) -> MultiChoiceSample:
    mask_id = special.gmask if use_task_mask else special.mask
    tokens = list(text)
    positions = list(range(len(text)))
    blank_filling = mask_id in text
    if blank_filling:
        mask_position = text.index(mask_id)
    else:  # the mask goes after the text
        mask_position = len(tokens)
        tokens.append(mask_id)
        positions.append(mask_position)
    division = len(tokens)
    blocks = [np.ones((division, division), dtype=np.int64)]
    target_ids = []
    for choice in choices:
        if use_task_mask:
            positions += range(division, division + len(choice))
        elif blank_filling or not unified_multitask_encoding:
            positions += [mask_position] * len(choice)
        else:
            positions += range(mask_position, mask_position + len(choice))
        target_ids.append(np.arange(len(tokens), len(tokens) + len(choice), dtype=np.int64))
        blocks.append(np.tril(np.ones((len(choice), len(choice)), dtype=np.int64)))
        tokens += [special.sop] + list(choice[:-1])
        if is_single_token:
            break
    mask = block_diagonal(*blocks)
    mask[:, :division] = 1
    return MultiChoiceSample(np.asarray(tokens, dtype=np.int64), np.asarray(positions, dtype=np.int64), mask,
                             [list(c) for c in choices], target_ids, is_single_token)


@dataclass
class GenerationSample:
    tokens: np.ndarray  # the context, ending in sop
    position_ids: np.ndarray
    attention_mask: np.ndarray  # [n, n], 1 = visible
    target_position_ids: np.ndarray  # [max_gen_length]


def generation_sample(text: list[int], max_gen_length: int, special: SpecialTokens, *, use_task_mask: bool,
                      unidirectional: bool) -> GenerationSample:
    """The context to generate after: blank filling if the mask is in the text, else the mask appended
    (prepended, with sop, for unidirectional attention)."""
    mask_id = special.gmask if use_task_mask else special.mask
    if mask_id in text:
        if unidirectional or use_task_mask:
            raise ValueError("a [gMASK] inside the text (blank filling) needs bidirectional attention and "
                             "use_task_mask: false")
        mask_position = text.index(mask_id)
        tokens = list(text) + [special.sop]
    else:
        mask_position = len(text)
        tokens = [mask_id, special.sop] + list(text) if unidirectional else list(text) + [mask_id, special.sop]
    n = len(tokens)
    positions = np.arange(n, dtype=np.int64)
    targets = np.arange(n, n + max_gen_length, dtype=np.int64)
    if not use_task_mask:  # [MASK]: sop and the blank all sit at the mask's position
        positions[n - 1:] = mask_position
        targets[:] = mask_position
    mask = np.tril(np.ones((n, n), dtype=np.int64))
    if not unidirectional:
        mask[: n - 1, : n - 1] = 1
    return GenerationSample(np.asarray(tokens, dtype=np.int64), positions, mask, targets)


@dataclass
class LanguageModelSample:
    tokens: np.ndarray  # [n]
    targets: np.ndarray  # [n]
    position_ids: np.ndarray
    attention_mask: np.ndarray  # [n, n], 1 = visible
    loss_mask: np.ndarray  # [n], 1 where a target is scored


def language_model_windows(num_tokens: int, max_seq_length: int, generation_length: int) -> int:
    """How many windows cover a document: the first scores max_seq_length - 1 tokens, each
    later one the next generation_length, seeing the tokens before them as a prompt."""
    rest = max(num_tokens - (max_seq_length - 1), 0)
    return -(-rest // generation_length) + 1


def language_model_sample(document: list[int], window: int, special: SpecialTokens, *, max_seq_length: int,
                          generation_length: int, use_task_mask: bool, unidirectional: bool) -> LanguageModelSample:
    start = window * generation_length
    tokens = document[start:start + max_seq_length - 1]  # one place is left for the mask
    mask_id = special.gmask if use_task_mask else special.mask
    if window == 0 or unidirectional:
        prompt, text = [], tokens
    else:
        prompt_length = max_seq_length - 1 - generation_length
        prompt, text = tokens[:prompt_length], tokens[prompt_length:]
    n = len(prompt) + len(text) + 1
    mask = np.tril(np.ones((n, n), dtype=np.int64))
    mask[: len(prompt) + 1, : len(prompt) + 1] = 1
    return LanguageModelSample(
        tokens=np.asarray(prompt + [mask_id, special.sop] + text[:-1], dtype=np.int64),
        targets=np.asarray(prompt + [mask_id] + text, dtype=np.int64),
        position_ids=np.arange(n, dtype=np.int64),
        attention_mask=mask,
        loss_mask=np.asarray([0] * (len(prompt) + 1) + [1] * len(text), dtype=np.int64),
    )


def padded_length(lengths: list[int]) -> int:
    return -(-max(lengths) // TILE) * TILE


def pad_batch(samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, position_ids [b, L] and the boolean mask [b, 1, L, L] (True = masked) of samples with
    `tokens`, `position_ids` and `attention_mask`; padding is token 0 at position 0, hidden from
    the real tokens (whose results are therefore those of the sample alone)."""
    length = padded_length([len(s.tokens) for s in samples])
    tokens = np.zeros((len(samples), length), dtype=np.int64)
    positions = np.zeros((len(samples), length), dtype=np.int64)
    visible = np.zeros((len(samples), length, length), dtype=np.int64)
    for row, sample in enumerate(samples):
        n = len(sample.tokens)
        tokens[row, :n] = sample.tokens
        positions[row, :n] = sample.position_ids
        visible[row, :n, :n] = sample.attention_mask
        visible[row, n:, 0] = 1  # padding rows see one key: fused attention has no empty softmax
    return torch.from_numpy(tokens), torch.from_numpy(positions), torch.from_numpy(visible < 1).unsqueeze(1)
