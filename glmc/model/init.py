"""Weight initialisations."""

from __future__ import annotations

import math

import torch

from glmc.model.transformer import GLMModel


@torch.no_grad()
def init_wide_random_(model: GLMModel, seed: int) -> GLMModel:
    """Random weights large enough that every sub-layer matters.

    With small (e.g. std 0.02) weights DeepNorm's `alpha * LN(x)` residual dominates
    and a tied-embedding model just repeats its last input token; these scales
    (the ones behind the SAT golden data) make attention and MLP visible in the
    output: embedding N(0, 1); qkv and h_to_4h N(0, 2/sqrt(fan_in)); dense and
    4h_to_h N(0, 6/sqrt(fan_in)); biases N(0, 0.1); LayerNorm weight 1 + N(0, 0.1),
    bias N(0, 0.1). One generator, parameters in state-dict order.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dtype == torch.int8:
            raise ValueError("cannot randomly initialise a quantized model")
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name.endswith("layernorm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        elif name == "word_embeddings.weight":
            value = noise
        elif "query_key_value" in name or "dense_h_to_4h" in name:
            value = noise * (2.0 / math.sqrt(param.shape[1]))
        else:  # attention.dense, dense_4h_to_h
            value = noise * (6.0 / math.sqrt(param.shape[1]))
        param.copy_(value.to(param.dtype))
    return model
