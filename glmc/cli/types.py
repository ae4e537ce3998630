"""Option types with the bounds every command needs: finite numbers, seeds torch accepts,
thread counts the machine can hold. A value outside them is a one-line usage error."""

from __future__ import annotations

import math
import os

import click

SEED_MAX = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (which every comparison lets through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = click.types.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def finite(min: float | None = None, max: float | None = None, *, min_open: bool = False) -> FiniteFloat:
    return FiniteFloat(min=min, max=max, min_open=min_open)


SEED = click.IntRange(0, SEED_MAX)


def threads() -> click.IntRange:
    """Intra-op threads: at most four per core. More only make the pools spin against each
    other, and ONNX Runtime crashes creating a pool of 100,000."""
    return click.IntRange(1, 4 * (os.cpu_count() or 1))
