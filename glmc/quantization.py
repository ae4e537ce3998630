"""Weight-only quantization as GLM-130B does it (tools/convert_tp.py, cuda/quantization.cu).

One scale per output row: ``scale = absmax(row) / (2**(bits-1) - 1)`` stored in fp16,
``q = round(w / scale)`` in int8. At 4 bits two values share a byte along the last
dim: the even column in the high nibble, the odd column in the low nibble.
Dequantized, a weight is ``half(q) * scale`` (fp16), as GLM-130B's CUDA kernel computes it.

Compiled graphs store the same codes and scales in the layout of the op that reads
them (the `*_layout` functions below, each with its inverse, so that a package gives
back GLM's codes and scales bit for bit):

* ONNX Runtime's `com.microsoft.MatMulNBits`: B [N, blocks, block_size * bits / 8]
  uint8, unsigned codes ``q + 2**(bits-1)`` (its default zero point), at 4 bits the
  lower index in the low nibble, K padded with the zero point to whole blocks;
  scales [N * blocks], each row's scale repeated for every block (GLM's per-row
  scale is exactly a block-wise scale constant along the row).
* ONNX `DequantizeLinear` feeding `MatMul` (the TensorRT target): the codes
  transposed to [K, N], int8 (per-channel scale [N], axis 1) or ONNX INT4 (two per
  byte over the flattened tensor, the lower index in the low nibble), with block-wise
  scales [blocks, N] along K (TensorRT takes INT4 only block-quantized).
"""

from __future__ import annotations

import math

import numpy as np
import torch

SUPPORTED_BITS = (4, 8)
# MatMulNBits' block size (and the TensorRT target's INT4 block size), the largest: a matrix of
# fewer input columns K takes the smallest power of two >= 16 that holds them (`block_size_for`),
# so that its last block is not mostly padding. The scale is the same for every block of a row,
# so the size changes only speed and the repeated scales' bytes; ONNX Runtime's CPU kernels take
# 16 to 256, and 128 was faster than 32 here.
BLOCK_SIZE = 128
MIN_BLOCK_SIZE = 16


def check_bits(bits, where: str) -> int:
    """`bits` if it is a supported width, else a ValueError naming `where`."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: quantization bit width must be 4 or 8, got {bits!r}")
    return bits


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


# --- numpy: GLM's codes <-> the graphs' layouts ----------------------------------------------

def signed_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """GLM's stored codes [N, K * bits / 8] -> int8 [N, K], one signed code per weight."""
    codes = np.asarray(codes).view(np.int8)
    if bits == 8:
        return codes
    high = codes >> 4  # arithmetic shifts of int8: sign-extended nibbles
    low = (codes << 4).astype(np.int8) >> 4
    return np.stack((high, low), axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)


def glm_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `signed_codes`: int8 [N, K] -> GLM's stored codes."""
    q = np.asarray(q, dtype=np.int8)
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        raise ValueError("int4 packing needs an even number of columns")
    return ((q[..., 0::2] << 4) | (q[..., 1::2] & 0x0F)).astype(np.int8)


def block_size_for(k: int, largest: int = BLOCK_SIZE) -> int:
    """The block size of a matrix with K input columns."""
    return min(largest, max(MIN_BLOCK_SIZE, 1 << (k - 1).bit_length()))


def blocks_of(k: int, largest: int = BLOCK_SIZE) -> int:
    return math.ceil(k / block_size_for(k, largest))


def matmul_nbits_layout(codes: np.ndarray, bits: int) -> np.ndarray:
    """GLM's codes [N, K * bits / 8] -> MatMulNBits' B, uint8 [N, blocks, block_size * bits / 8]."""
    q = signed_codes(codes, bits)
    n, k = q.shape
    block_size = block_size_for(k)
    blocks = blocks_of(k)
    unsigned = np.full((n, blocks * block_size), 2 ** (bits - 1), dtype=np.uint8)  # padding reads as 0
    unsigned[:, :k] = (q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        unsigned = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)  # the lower index in the low nibble
    return unsigned.reshape(n, blocks, block_size * bits // 8)


def from_matmul_nbits_layout(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The inverse of `matmul_nbits_layout` (K, the unpadded input width, from the parameter's shape)."""
    n = b.shape[0]
    flat = np.asarray(b, dtype=np.uint8).reshape(n, -1)
    if bits == 4:
        flat = np.stack((flat & 0x0F, flat >> 4), axis=-1).reshape(n, -1)
    q = (flat[:, :k].astype(np.int16) - 2 ** (bits - 1)).astype(np.int8)
    return glm_codes(q, bits)


def block_scales(scale: np.ndarray, k: int) -> np.ndarray:
    """Per-row scales [N] -> MatMulNBits' scales [N * blocks], each row's repeated per block."""
    return np.repeat(np.asarray(scale), blocks_of(k))


def from_block_scales(scales: np.ndarray, n: int) -> np.ndarray:
    """The inverse of `block_scales` (the first block's scale of each row), as fp16."""
    return np.asarray(scales).reshape(n, -1)[:, 0].astype(np.float16)


def dequantize_linear_layout(codes: np.ndarray, bits: int) -> np.ndarray:
    """GLM's codes [N, K * bits / 8] -> `DequantizeLinear`'s x: [K, N] int8 at 8 bits; at 4 bits
    ONNX INT4's bytes, uint8 [K, N / 2] (flattened index i in the low nibble of byte i / 2 when even)."""
    q = np.ascontiguousarray(signed_codes(codes, bits).T)
    if bits == 8:
        return q
    return onnx_int4_bytes(q)


def from_dequantize_linear_layout(stored: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `dequantize_linear_layout`."""
    stored = np.asarray(stored)
    if bits == 8:
        return np.ascontiguousarray(stored.view(np.int8).T)
    k = stored.shape[0]
    q = onnx_int4_values(stored.view(np.uint8)).reshape(k, -1)
    return glm_codes(np.ascontiguousarray(q.T), bits)


def onnx_int4_bytes(q: np.ndarray) -> np.ndarray:
    """Signed codes [..., C] (C even) -> ONNX INT4 storage [..., C / 2]: lower index, low nibble."""
    u = q.astype(np.uint8) & 0x0F
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def onnx_int4_values(stored: np.ndarray) -> np.ndarray:
    """ONNX INT4 storage [..., B] -> int8 [..., 2 * B], sign-extended."""
    stored = stored.view(np.int8)
    low = (stored << 4).astype(np.int8) >> 4
    high = stored >> 4
    return np.stack((low, high), axis=-1).reshape(*stored.shape[:-1], stored.shape[-1] * 2)


def dequantize_linear_scales(scale: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Per-row fp16 scales [N] -> `DequantizeLinear`'s: [N] (int8, per channel), [blocks, N] (int4)."""
    scale = np.asarray(scale, dtype=np.float16)
    if bits == 8:
        return scale
    return np.ascontiguousarray(np.broadcast_to(scale, (blocks_of(k), scale.shape[0])))


def from_dequantize_linear_scales(stored: np.ndarray, bits: int) -> np.ndarray:
    stored = np.asarray(stored, dtype=np.float16)
    return stored if bits == 8 else stored[0]
