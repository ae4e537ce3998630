"""Rotary position embedding with SwissArmyTransformer 0.2.12's fp16 table.

GLM-130B was trained with SAT's table: ``inv_freq`` rounded to fp16, positions and
their products in fp16, cos/sin taken of those fp16 angles and rounded to fp16
(whatever the model dtype; for bf16 models SAT rounds the same cos/sin to bf16).
An exact fp32 table moves the logits visibly, so we reproduce SAT's.

cos/sin of a half tensor run in float on CUDA, where GLM-130B trained; PyTorch's
CPU half kernels round 22 of the 262,144 entries of GLM-130B's table (positions
>= 300) differently. The table is therefore computed explicitly as float32 cos/sin
of the fp16 angles, rounded once to the table dtype, on every device.
"""

from __future__ import annotations

import torch


def sat_rotary_table(max_positions: int, head_dim: int, base: float,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [max_positions, head_dim], holding SAT's values in `dtype`."""
    inv_freq = (1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))).half()
    positions = torch.arange(max_positions, dtype=torch.float16)
    angles = torch.outer(positions, inv_freq)  # [pos, hd/2], one fp16 rounding per product
    angles = torch.cat((angles, angles), dim=-1).float()  # [pos, hd], exact fp16 values
    table_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    cos, sin = angles.cos().to(table_dtype), angles.sin().to(table_dtype)
    # Widening fp16 -> fp32 is exact: an fp32 model multiplies by the same values
    # SAT's type promotion would.
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, hd]; cos, sin [b, 1, s, hd] gathered at the position ids."""
    return x * cos + rotate_half(x) * sin
