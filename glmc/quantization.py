"""Weight-only quantization as GLM-130B does it (tools/convert_tp.py, cuda/quantization.cu).

One scale per output row: ``scale = absmax(row) / (2**(bits-1) - 1)`` stored in fp16,
``q = round(w / scale)`` in int8. At 4 bits two values share a byte along the last
dim: the even column in the high nibble, the odd column in the low nibble.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (4, 8)


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] float -> (int8 [rows, cols * bits / 8], fp16 scale [rows])."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported quantization bit width {bits}")
    scale = (weight.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    # A zero row has scale 0; keep its codes at 0 instead of 0/0.
    safe_scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(weight / safe_scale[:, None]).to(torch.int8)
    if bits == 4:
        q = pack_int4(q)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [rows, cols] -> [rows, cols / 2] bytes (even col high)."""
    if q.shape[-1] % 2:
        raise ValueError("int4 packing needs an even number of columns")
    high, low = q[..., 0::2], q[..., 1::2]
    return ((high << 4) | (low & 0x0F)).to(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols / 2] bytes -> int8 [rows, cols], sign-extending each nibble."""
    high = packed >> 4  # arithmetic shift of int8 keeps the sign
    low = (packed << 4) >> 4
    return torch.stack((high, low), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes and fp16 scales -> fp16 weight, ``half(q) * scale`` as the CUDA kernel computes it."""
    if bits == 4:
        q = unpack_int4(q)
    return q.half() * scale.half()[:, None]
