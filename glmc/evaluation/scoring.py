"""What a task asks of the model (GLM-130B's evaluation/model.py), on any backend.

`model` is a `glmc.GLM`: the same runtime `glmc run` uses, so every backend and
tensor-parallel degree evaluates alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc.evaluation.samples import GenerationSample, LanguageModelSample, MultiChoiceSample, pad_batch
from glmc.generation.filling import GenerationInput, generate, generated_tokens


def choice_log_probs(model, samples: list[MultiChoiceSample]) -> list[list[float]]:
    """Per sample, each choice's summed log-probability (`cond_log_prob`).

    Log-probabilities are rounded to the compute dtype before they are summed, as
    GLM-130B's half-precision log_softmax leaves them.
    """
    tokens, positions, mask = pad_batch(samples)
    logits = model.logits(tokens, positions, mask, float32=False)[0]
    log_probs = F.log_softmax(logits.float(), dim=-1).to(logits.dtype)
    out = []
    for row, sample in enumerate(samples):
        if sample.is_single_token:  # one sop: its logits score every choice's only token
            ids = torch.tensor([c[0] for c in sample.choices])
            out.append(log_probs[row, int(sample.choice_target_ids[0][0]), ids].float().tolist())
            continue
        scores = []
        for choice, targets in zip(sample.choices, sample.choice_target_ids):
            picked = log_probs[row, torch.from_numpy(targets), torch.tensor(choice)]
            scores.append(float(picked.float().sum().to(logits.dtype)))
        out.append(scores)
    return out


def window_losses(model, samples: list[LanguageModelSample]) -> list[float]:
    """Per window, the summed cross entropy (FP32) of its scored targets (`calculate_loss`)."""
    tokens, positions, mask = pad_batch(samples)
    logits = model.logits(tokens, positions, mask)[0]  # float32
    length = tokens.shape[1]
    targets = torch.zeros_like(tokens)
    weights = torch.zeros(tokens.shape, dtype=torch.float32)
    for row, sample in enumerate(samples):
        targets[row, : len(sample.targets)] = torch.from_numpy(sample.targets)
        weights[row, : len(sample.loss_mask)] = torch.from_numpy(sample.loss_mask).float()
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (losses.reshape(-1, length) * weights).sum(dim=-1).tolist()


def generate_text(model, samples: list[GenerationSample], strategy) -> list[list[int]]:
    """Per sample, the best beam's generated ids, end token dropped (`generate_text`)."""
    inputs = [GenerationInput(s.tokens.tolist(), s.position_ids.tolist(), torch.from_numpy(s.attention_mask < 1),
                              s.target_position_ids.tolist()) for s in samples]
    special = model.special_tokens()
    with model.reporting():
        beams = generate(model.executable, inputs, strategy, special, device=model.device)
    return [generated_tokens(row[0].tokens, len(i.tokens), special.end_tokens) for row, i in zip(beams, inputs)]
