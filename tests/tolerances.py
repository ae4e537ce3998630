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
    # another order (cache vs recomputation, padded vs not): rounding amplified by
    # 2-3 layers of wide random weights measures 0.5e-5 to 1.3e-5 of the peak (SAT's
    # own cache vs recomputation differ as much).
    "float32": Tolerance(2e-5, "fp32 rounding"),
    # One fp32 layer from the exact input of that layer: no amplification across
    # layers (measured <= 1.2e-6).
    "float32-layer": Tolerance(1e-5, "fp32 rounding within one layer"),
    # fp16 against SAT's own fp16 path (same op sequence, other kernels).
    "float16": Tolerance(2e-3, "fp16 kernels of another library"),
    # bf16 has 8 bits of mantissa; only used against another bf16 run.
    "bfloat16": Tolerance(1e-2, "bf16"),
}


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, tolerance: str, what: str = "values") -> float:
    """Assert agreement within TOLERANCES[tolerance]; return the relative error."""
    a, e = _numpy(actual), _numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    diff = np.abs(a - e)
    peak = float(np.abs(e).max()) or 1.0
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    rel = float(diff.max()) / peak
    limit = TOLERANCES[tolerance].rel
    assert rel <= limit, (
        f"{what}: max |diff| {diff.max():.3e} at index {tuple(int(i) for i in worst)} "
        f"(actual {a[worst]:.6g}, expected {e[worst]:.6g}) is {rel:.2e} of the peak {peak:.4g}; "
        f"allowed {limit:.0e} ({TOLERANCES[tolerance].why}); {int((diff > limit * peak).sum())} elements over")
    return rel
