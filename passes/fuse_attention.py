"""Fuse GLM's attention into opset-23 `Attention` (past K/V in, present K/V out, FP32 softmax).

Pattern (the reference model, q/k/v [b, heads, s, hd]; [..] only in some graphs):
    [present_k = Concat(past_k, k, axis=2)]          [present_v = Concat(past_v, v, axis=2)]
    scores = MatMul(Div(q, sqrt(hd) * c), Transpose(present_k, [0, 1, 3, 2]))
    probs  = Softmax([Mul]([Cast float](Where(mask, -10000, scores)), c), axis=-1)
    out    = MatMul([Cast dtype](probs), present_v)
with c = layer_id + 1 (query-key layer scaling; the Mul vanishes when c = 1).
Check: a boolean mask, a fill far below any score (so that masking by -inf gives
the same softmax), static 4-D shapes, the Casts going to FLOAT and back.
Rewrite: Attention(Div(q, ..), k, v, Not(mask), [past_k, past_v], scale=c,
softmax_precision=FLOAT) -> out[, present_k, present_v]. q keeps SAT's division
by sqrt(hd) * c before the product, which keeps fp16 scores in range.
Rows whose every key is masked differ (SAT: uniform; Attention: undefined);
glmc's runtime never builds one.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from glmc.passes.base import PassOutcome, Target, scalar

NAME = "fuse_attention"
FLOAT = 1  # onnx TensorProto.FLOAT, the softmax_precision attribute's value
MAX_FILL = -1e4  # SAT's masked value; anything lower also leaves exp() at 0 for masked keys


class AttentionFusion(pattern.RewriteRuleClassBase):
    def __init__(self, outcome: PassOutcome, *, with_past: bool, scaled: bool, casts: bool):
        super().__init__(name=f"GLMAttention(past={with_past}, scaled={scaled}, casts={casts})")
        self.outcome, self.with_past, self.scaled, self.casts = outcome, with_past, scaled, casts

    def pattern(self, op, q, divisor, k, v, past_k, past_v, mask, fill, coeff):
        keys = op.Concat(past_k, k, axis=2, _outputs=["present_k"]) if self.with_past else k
        values = op.Concat(past_v, v, axis=2, _outputs=["present_v"]) if self.with_past else v
        scores = op.MatMul(op.Div(q, divisor, _outputs=["q_scaled"]),
                           op.Transpose(keys, _outputs=["keys_t"]))
        x = op.Where(mask, fill, scores)
        if self.casts:
            x = op.Cast(x, _outputs=["to_float"])
        if self.scaled:
            x = op.Mul(x, coeff)
        probs = op.Softmax(x, _outputs=["probs"])
        if self.casts:
            probs = op.Cast(probs, _outputs=["to_model_dtype"])
        out = op.MatMul(probs, values)
        return (out, keys, values) if self.with_past else out

    def check(self, context, q, k, v, mask, fill, coeff, keys_t, probs, **values) -> pattern.MatchResult:
        reason = self.why_not(q, k, v, mask, fill, coeff, keys_t, probs, values)
        if reason:
            self.outcome.declined.append(reason)
            return pattern.MatchResult().fail(reason)
        return pattern.MatchResult()

    def why_not(self, q, k, v, mask, fill, coeff, keys_t, probs, values) -> str | None:
        for t in (q, k, v):
            if t.shape is None or len(t.shape) != 4:
                return f"{t.name}: not a 4-D [batch, heads, seq, head_dim] tensor"
        if mask.dtype != ir.DataType.BOOL:
            return f"{mask.name}: the mask is not boolean"
        fill_value = scalar(fill)
        if fill_value is None or fill_value > MAX_FILL:
            return f"masked scores are filled with {fill_value}, not a large negative: a boolean mask would change the result"
        if self.scaled and scalar(coeff) is None:
            return "the score scale is not a constant"
        perm = keys_t.producer().attributes.get("perm")
        if perm is None or list(perm.as_ints()) != [0, 1, 3, 2]:
            return f"{keys_t.name}: keys are not transposed to [b, heads, hd, seq]"
        axis = probs.producer().attributes.get("axis")
        if axis is not None and axis.as_int() not in (-1, 3):
            return f"{probs.name}: softmax over axis {axis.as_int()}, not the keys"
        if self.casts:
            up = values["to_float"].producer().attributes["to"].as_int()
            down = values["to_model_dtype"].producer().attributes["to"].as_int()
            if up != FLOAT or down != v.dtype.value:
                return "the softmax is not computed in FP32 between casts from and back to the model dtype"
        return None

    def rewrite(self, op, q, divisor, k, v, past_k, past_v, mask, coeff, **_):
        self.outcome.count += 1
        q_scaled = op.Div(q, divisor)
        keep = op.Not(mask)  # Attention's boolean masks say which keys take part
        scale = float(scalar(coeff)) if self.scaled else 1.0
        if self.with_past:
            return op.Attention(q_scaled, k, v, keep, past_k, past_v, scale=scale, softmax_precision=FLOAT,
                                _outputs=3)
        return op.Attention(q_scaled, k, v, keep, scale=scale, softmax_precision=FLOAT)


def rules(outcome: PassOutcome) -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([
        AttentionFusion.rule(outcome, with_past=past, scaled=scaled, casts=casts)
        for past in (True, False) for scaled in (True, False) for casts in (True, False)
    ])


def run(model: ir.Model, target: Target) -> PassOutcome:
    outcome = PassOutcome(NAME)
    if not target.fused_attention:
        outcome.declined.append(f"target {target.name} keeps attention as primitives")
        return outcome
    rules(outcome).apply_to_model(model)
    return outcome
