"""Per-dtype tolerances, and a comparison that says where tensors differ.

A comparison passes when max |actual - expected| <= rel * max |expected|: errors
are measured against the scale of the values, since the test models' hidden
states and logits reach ~100, where one fp32 ulp is already ~8e-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Tolerance:
    rel: float  # of the peak magnitude of the expected values
    why: str


TOLERANCES = {
    # fp32 against an exact (float64) computation, or two fp32 computations in
    # another order (cache vs recomputation, padded vs not, ONNX Runtime's kernels vs
    # torch's): rounding amplified by 2-3 layers of wide random weights measures 0.5e-5
    # to 1.3e-5 of the peak (SAT's own cache vs recomputation differ as much), and up to
    # 2.1e-5 for a left-padded batch through 3 fused layers, depending on thread counts.
    "float32": Tolerance(3e-5, "fp32 rounding"),
    # One fp32 layer from the exact input of that layer: no amplification across
    # layers (measured <= 1.2e-6).
    "float32-layer": Tolerance(1e-5, "fp32 rounding within one layer"),
    # fp16 against SAT's own fp16 path (same op sequence, other kernels).
    "float16": Tolerance(2e-3, "fp16 kernels of another library"),
    # bf16 has 8 bits of mantissa; only used against another bf16 run.
    "bfloat16": Tolerance(1e-2, "bf16"),
    # Weight-only int8 / int4 on ONNX Runtime's MatMulNBits, against the reference model run on
    # GLM-130B's dequantized weights: the same codes and scales, but MatMulNBits multiplies by
    # q * scale in float32 where GLM-130B's kernel rounds half(q) * scale to fp16 first (up to
    # 2^-11 of each weight). Wide random weights amplify that rounding as they amplify fp16's
    # (see half_precision_limit), so the limit is `quantized_limit`: twice the reference's own
    # distance from the reference run on the exact products q * scale (that distance measured on
    # glm-tiny: 1.1e-3 to 1.6e-3 of the peak at one layer, 1.3e-2 to 1.8e-2 at three), never below
    # this. Against the exact-product reference MatMulNBits is held to "float32" (measured 1e-6).
    # Every other backend and target computes GLM's rounding exactly and is held to "float32"
    # against the reference itself.
    "int8": Tolerance(2e-3, "MatMulNBits: q * scale without GLM's fp16 rounding"),
    "int4": Tolerance(2e-3, "MatMulNBits: q * scale without GLM's fp16 rounding"),
}


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|."""
    a, e = _numpy(actual), _numpy(expected)
    return float(np.abs(a - e).max()) / (float(np.abs(e).max()) or 1.0)


def half_precision_limit(reference, exact, dtype: str) -> float:
    """The limit for a half-precision computation against the reference model run in the same
    dtype (`reference`) on the same inputs. Two half-precision roundings of one computation
    (other kernels, other op order, ONNX Runtime's fp32 fallbacks) differ by about as much as
    either differs from the fp32 result (`exact`), and with wide random weights that
    distance grows layer by layer (measured on glm-tiny: fp16 3.7e-3, 1.4e-2 and 4e-2 of the
    peak at 1, 2 and 3 layers). So the limit is twice the reference's own distance from fp32,
    and never below the table's value for the dtype."""
    return max(TOLERANCES[dtype].rel, 2.0 * relative_error(reference, exact))


def quantized_limit(reference, exact_products, bits: int) -> float:
    """The limit for MatMulNBits' logits against the reference on GLM-130B's dequantized weights
    (`reference`), given the reference run on the exact products q * scale on the same inputs
    (`exact_products`): twice their distance, never below the table's row for the bit width."""
    return max(TOLERANCES[f"int{bits}"].rel, 2.0 * relative_error(reference, exact_products))


def assert_close(actual, expected, tolerance: str, what: str = "values", limit: float | None = None) -> float:
    """Assert agreement within TOLERANCES[tolerance] (or within `limit` of the peak, which
    replaces the table's value); return the relative error."""
    a, e = _numpy(actual), _numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    diff = np.abs(a - e)
    peak = float(np.abs(e).max()) or 1.0
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    rel = float(diff.max()) / peak
    limit = TOLERANCES[tolerance].rel if limit is None else limit
    assert rel <= limit, (
        f"{what}: max |diff| {diff.max():.3e} at index {tuple(int(i) for i in worst)} "
        f"(actual {a[worst]:.6g}, expected {e[worst]:.6g}) is {rel:.2e} of the peak {peak:.4g}; "
        f"allowed {limit:.0e} ({TOLERANCES[tolerance].why}); {int((diff > limit * peak).sum())} elements over")
    return rel
