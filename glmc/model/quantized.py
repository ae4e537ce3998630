"""Weight-only quantized matmul: `x @ dequantize(q, scale)^T` without the float weight.

GLM-130B's CUDA kernel dequantizes each weight as ``half(q) * scale`` and multiplies;
a quantized model that dequantized its whole weights on every forward would cost the
memory traffic of an unquantized one. Here the weights stay int8 / packed int4:

* activations in bfloat16 on CPU: PyTorch's weight-only kernels (`_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`, gpt-fast's), which read the codes directly. They take
  bfloat16 scales and return bfloat16: numerics of a bfloat16 model.
* otherwise (float32, float16, any device): blocks of output rows, each dequantized with
  GLM's numerics (``half(q) * scale``, then the compute dtype) into a buffer of about
  1 MiB and multiplied; only one block of float weights exists at a time. (PyTorch's
  packed kernels also take float32 activations, but on CPU without a vectorised path:
  10 to 25 times slower than a dense fp32 matmul, measured on this project's machine.)
* under torch.compile: the plain `linear(x, dequantize(q, scale))`, which the compiler fuses.
* traced for ONNX: one node `glmc.WeightOnlyMatMul(x, q, scale; bits)` with exactly this
  meaning, which `passes/weight_only_matmul` lowers for the target (MatMulNBits, or
  DequantizeLinear feeding MatMul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmc.quantization import dequantize, unpack_int4

DOMAIN = "glmc"
OP = "WeightOnlyMatMul"
_BLOCK_BYTES = 1 << 20  # float weights dequantized at a time: stays in the L2 cache
_INT4_GROUPS = (256, 128, 64, 32)  # group sizes the int4 CPU kernel takes


def weight_only_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int,
                       cache: dict | None = None) -> torch.Tensor:
    """`x [..., K] @ W^T` for W = half(q) * scale [N, K], given GLM's codes and fp16 scales.

    `cache` (owned by the caller, one per weight) keeps the kernel layout of the codes
    that the packed int4 kernel needs, made on first use."""
    n = codes.shape[0]
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP}", [x, codes, scale], attrs={"bits": bits},
                                       dtype=x.dtype, shape=(*x.shape[:-1], n), version=1)
    if torch.compiler.is_compiling():
        return F.linear(x, dequantize(codes, scale, bits).to(x.dtype))
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        out = _packed_kernel(x2, codes, scale, bits, cache)
        if out is not None:
            return out.reshape(*lead, n)
    return _blocked(x2, codes, scale, bits).reshape(*lead, n)


def _blocked(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    n, k = codes.shape[0], x.shape[-1]
    rows = max(1, _BLOCK_BYTES // (k * x.element_size()))
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    half = torch.empty(min(rows, n), k, dtype=torch.float16, device=x.device)
    scale = scale.to(torch.float16)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        q = codes[start:stop]
        if bits == 4:
            q = unpack_int4(q)
        w = torch.mul(q, scale[start:stop, None], out=half[: stop - start])  # half(q) * scale, rounded once
        torch.mm(x, w.to(x.dtype).T, out=out[:, start:stop])
    return out


def _packed_kernel(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int,
                   cache: dict | None) -> torch.Tensor | None:
    """PyTorch's weight-only CPU kernels in bfloat16; None where they do not apply."""
    if bits == 8:
        return torch._weight_int8pack_mm(x, codes, scale.to(torch.bfloat16))
    k = x.shape[-1]
    group = next((g for g in _INT4_GROUPS if k % g == 0), None)
    if group is None or codes.shape[0] % 16:  # the kernel's tiles: 16 output rows
        return None
    key = (codes.data_ptr(), codes._version, codes.device, group)  # _version: the codes rewritten in place
    entry = cache.get("int4") if cache is not None else None
    if entry is None or entry[0] != key:
        q = unpack_int4(codes).to(torch.int32) + 8  # the kernel's codes are unsigned, zero point 8
        # One scale per row: every group of the row gets it; the kernel's "zero" is added after
        # scaling, so 0 keeps w = (u - 8) * scale = q * scale.
        scales = scale.to(torch.bfloat16)[None, :, None].expand(k // group, -1, 1)
        entry = (key, torch._convert_weight_to_int4pack_for_cpu(q, 2),
                 torch.cat((scales, torch.zeros_like(scales)), dim=-1).contiguous())
        if cache is not None:
            cache["int4"] = entry  # one assignment: a concurrent caller sees the old entry or the new one
    return torch._weight_int4pack_mm_for_cpu(x, entry[1], group, entry[2])

