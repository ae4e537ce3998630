"""Fuse GLM's rotary embedding into opset-23 `RotaryEmbedding`.

Pattern (the reference model's `x * cos + rotate_half(x) * sin`, x [b, heads, s, hd]):
    cos = Unsqueeze(Gather(cos_table, position_ids), [1]);  sin likewise
    Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, hd/2:)), Slice(x, :hd/2)), sin))
Check: x 4-D with a static head dim; the slices cut the head dim in halves; the
tables are constants [positions, hd] whose two halves are equal (GLM-130B's
`cat(freqs, freqs)`), of x's dtype.
Rewrite: RotaryEmbedding(x, cos_table[:, :hd/2], sin_table[:, :hd/2], position_ids),
non-interleaved. The half tables hold SAT's fp16 values unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from glmc.passes.base import PassOutcome, Target, constant, ints

NAME = "fuse_rotary"
HALF_SUFFIX = ".half"


class RotaryFusion(pattern.RewriteRuleClassBase):
    def __init__(self, outcome: PassOutcome):
        super().__init__(name="GLMRotaryEmbedding", remove_nodes=False)
        self.outcome = outcome
        self.halves: dict[str, ir.Value] = {}

    def pattern(self, op, x, cos_table, sin_table, position_ids, cos_axes, sin_axes,
                hi_start, hi_end, hi_axes, hi_steps, lo_start, lo_end, lo_axes, lo_steps):
        cos = op.Unsqueeze(op.Gather(cos_table, position_ids, axis=0), cos_axes)
        sin = op.Unsqueeze(op.Gather(sin_table, position_ids, axis=0), sin_axes)
        upper = op.Slice(x, hi_start, hi_end, hi_axes, hi_steps)
        lower = op.Slice(x, lo_start, lo_end, lo_axes, lo_steps)
        rotated = op.Concat(op.Neg(upper), lower, axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, x, cos_table, sin_table, cos_axes, sin_axes, hi_start, hi_end, hi_axes,
              hi_steps, lo_start, lo_end, lo_axes, lo_steps, **_) -> pattern.MatchResult:
        reason = self.why_not(x, cos_table, sin_table, cos_axes, sin_axes, hi_start, hi_end, hi_axes, hi_steps,
                              lo_start, lo_end, lo_axes, lo_steps)
        if reason:
            self.outcome.declined.append(reason)
            return pattern.MatchResult().fail(reason)
        return pattern.MatchResult()

    @staticmethod
    def why_not(x, cos_table, sin_table, cos_axes, sin_axes, hi_start, hi_end, hi_axes, hi_steps,
                lo_start, lo_end, lo_axes, lo_steps) -> str | None:
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
            return f"{x.name}: not a 4-D [batch, heads, seq, head_dim] tensor with a static head dim"
        hd = x.shape[3]
        if ints(cos_axes) != [1] or ints(sin_axes) != [1]:
            return f"{x.name}: cos/sin are not broadcast over the heads axis"
        last_axis = ([3], [-1])
        if not (ints(hi_start) == [hd // 2] and (ints(hi_end) or [0])[0] >= hd and ints(hi_axes) in last_axis
                and ints(hi_steps) == [1] and ints(lo_start) == [0] and ints(lo_end) == [hd // 2]
                and ints(lo_axes) in last_axis and ints(lo_steps) == [1]):
            return f"{x.name}: the head dim is not cut in halves (rotate_half)"
        for table in (cos_table, sin_table):
            values = constant(table)
            if values is None or values.ndim != 2 or values.shape[1] != hd:
                return f"{table.name}: not a constant [positions, {hd}] table"
            if not np.array_equal(values[:, : hd // 2], values[:, hd // 2:]):
                return f"{table.name}: its halves differ, so it is not a rotate-half table"
            if table.dtype != x.dtype:
                return f"{table.name}: dtype {table.dtype} differs from {x.name}'s {x.dtype}"
        return None

    def half(self, op, table: ir.Value) -> ir.Value:
        if table.name not in self.halves:
            values = constant(table)
            tensor = ir.tensor(np.ascontiguousarray(values[:, : values.shape[1] // 2]), name=table.name + HALF_SUFFIX)
            self.halves[table.name] = op.initializer(tensor, name=table.name + HALF_SUFFIX)
        return self.halves[table.name]

    def rewrite(self, op, x, cos_table, sin_table, position_ids, **_):
        self.outcome.count += 1
        return op.RotaryEmbedding(x, self.half(op, cos_table), self.half(op, sin_table), position_ids,
                                  interleaved=0)


def run(model: ir.Model, target: Target) -> PassOutcome:
    outcome = PassOutcome(NAME)
    if not target.fused_rotary:
        outcome.declined.append(f"target {target.name} keeps rotary as primitives")
        return outcome
    pattern.RewriteRuleSet([RotaryFusion.rule(outcome)]).apply_to_model(model)
    return outcome
