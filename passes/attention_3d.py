"""Run the fused attention on [batch, seq, hidden] tensors: no transposes around it.

GLM's fused QKV is head-major (each head's q, k, v rows adjacent), so the traced
graph reshapes it to [b, s, heads, 3 * hd], splits, and transposes q, k and v to
[b, heads, s, hd] for RotaryEmbedding and Attention, then transposes the context
back. Both ops also take 3-D inputs with a head count, so with the QKV weight's
output columns regrouped as [all q | all k | all v] the whole detour disappears.

Pattern: Add(MatMul(x, W), b) -> Reshape -> Split(3) -> Transpose x3 ->
RotaryEmbedding(q), RotaryEmbedding(k) -> Div(q) -> Attention -> Transpose -> Reshape;
in a quantized model Add(glmc.WeightOnlyMatMul(x, codes, scale), b) in place of the
MatMul (GLM's codes [N, K * bits / 8] and scales [N], one per output row).
Check: W (or codes and scales) and b constants; the reshape ends in [heads, 3 * hd];
the transposes swap seq and heads; the context goes back to [b, s, heads * hd].
Rewrite: W and b with regrouped columns (`W.qkv`, `b.qkv`, computed lazily; the codes'
rows and the scales regrouped alike, exactly: each output row keeps its own codes and
scale), one Split into q, k, v [b, s, h], RotaryEmbedding and Attention with num_heads /
q_num_heads / kv_num_heads. The numbers are the same dot products, reordered.
Attention returns the cache as [b, heads, seq, hd] when it has a past; without
one (prefill) k and v are reshaped to that layout for the graph's outputs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from glmc.model.quantized import DOMAIN
from glmc.passes.base import PassOutcome, Target, constant, ints

NAME = "attention_3d"
SUFFIX = ".qkv"  # output columns grouped [q heads | k heads | v heads]


def group_columns(array: np.ndarray, heads: int) -> np.ndarray:
    """Last axis [heads, 3, hd] (head-major) -> [3, heads, hd]."""
    lead = array.shape[:-1]
    hd = array.shape[-1] // (3 * heads)
    return np.ascontiguousarray(array.reshape(*lead, heads, 3, hd).swapaxes(-3, -2).reshape(*lead, 3 * heads * hd))


def ungroup_columns(array: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `group_columns`."""
    lead = array.shape[:-1]
    hd = array.shape[-1] // (3 * heads)
    return np.ascontiguousarray(array.reshape(*lead, 3, heads, hd).swapaxes(-3, -2).reshape(*lead, 3 * heads * hd))


def group_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """First axis [heads, 3, hd] (head-major) -> [3, heads, hd]: a quantized weight's output rows."""
    return np.ascontiguousarray(group_columns(array.T, heads).T)


def ungroup_rows(array: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `group_rows`."""
    return np.ascontiguousarray(ungroup_columns(array.T, heads).T)


class GroupedColumns(ir.LazyTensor):
    """`source` with its output features regrouped: the last axis of a float weight [K, N] or a
    bias or scales [N]; the first of quantized codes [N, K * bits / 8] (`rows`)."""

    def __init__(self, source: ir.TensorProtocol, heads: int, name: str, rows: bool = False):
        regroup = group_rows if rows else group_columns
        super().__init__(lambda: ir.tensor(regroup(source.numpy(), heads), name=name),
                         dtype=source.dtype, shape=ir.Shape(list(source.shape)), name=name)


class Attention3D(pattern.RewriteRuleClassBase):
    def __init__(self, outcome: PassOutcome, *, with_past: bool, quantized: bool):
        super().__init__(name=f"GLMAttention3D(past={with_past}, quantized={quantized})")
        self.outcome, self.with_past, self.quantized = outcome, with_past, quantized

    def pattern(self, op, x, weight, scale, bias, qkv_shape, cos, sin, positions, divisor, mask, past_k, past_v,
                out_shape):
        if self.quantized:
            product = op.WeightOnlyMatMul(x, weight, scale, _domain=DOMAIN, _outputs=["qkv_product"])
        else:
            product = op.MatMul(x, weight, _outputs=["qkv_product"])
        qkv = op.Reshape(op.Add(product, bias), qkv_shape, _outputs=["qkv4"])
        q, k, v = op.Split(qkv, _outputs=["q4", "k4", "v4"])
        q = op.Transpose(q, _outputs=["qt"])
        k = op.Transpose(k, _outputs=["kt"])
        v = op.Transpose(v, _outputs=["vt"])
        q = op.Div(op.RotaryEmbedding(q, cos, sin, positions, _outputs=["q_rot"]), divisor)
        k = op.RotaryEmbedding(k, cos, sin, positions, _outputs=["k_rot"])
        if self.with_past:
            context, present_k, present_v = op.Attention(q, k, v, mask, past_k, past_v, _outputs=[
                "attn_out", "present_k", "present_v"])
        else:
            context = op.Attention(q, k, v, mask, _outputs=["attn_out"])
        out = op.Reshape(op.Transpose(context, _outputs=["context_t"]), out_shape)
        # Without a past, the cache the graph returns is k and v themselves, [b, heads, s, hd].
        return (out, present_k, present_v) if self.with_past else (out, k, v)

    def check(self, context, weight, bias, qkv4, qt, kt, vt, context_t, out_shape, scale=None,
              **_) -> pattern.MatchResult:
        reason = self.why_not(weight, scale, bias, qkv4, qt, kt, vt, context_t, out_shape)
        if reason:
            self.outcome.declined.append(reason)
            return pattern.MatchResult().fail(reason)
        return pattern.MatchResult()

    def why_not(self, weight, scale, bias, qkv4, qt, kt, vt, context_t, out_shape) -> str | None:
        if constant(weight) is None or constant(bias) is None or (self.quantized and constant(scale) is None):
            return "the QKV weight or bias is not a constant"
        if qkv4.shape is None or len(qkv4.shape) != 4 or not all(isinstance(d, int) for d in qkv4.shape[2:]):
            return f"{qkv4.name}: not reshaped to [b, s, heads, 3 * hd] with static heads"
        heads, width = qkv4.shape[2], qkv4.shape[3]
        outputs = weight.shape[0] if self.quantized else weight.shape[-1]  # codes [N, ...], W^T [K, N]
        if width % 3 or outputs != heads * width:
            return f"{qkv4.name}: the reshape does not split the QKV output head-major"
        for t in (qt, kt, vt, context_t):
            perm = t.producer().attributes.get("perm")
            if perm is None or list(perm.as_ints()) != [0, 2, 1, 3]:
                return f"{t.name}: not a seq/heads transpose"
        split = qkv4.uses()[0].node if len(qkv4.uses()) == 1 else None
        if split is None or (split.attributes.get("axis") and split.attributes["axis"].as_int() not in (3, -1)):
            return f"{qkv4.name}: not split along its last axis"
        shape = ints(out_shape)
        if shape is not None and (len(shape) != 3 or shape[-1] not in (-1, heads * width // 3)):
            return "the context is not reshaped back to [b, s, hidden]"
        return None

    def rewrite(self, op, x, weight, bias, qkv4, cos, sin, positions, divisor, mask, past_k, past_v,
                q_rot, scale=None, **values):
        self.outcome.count += 1
        heads = qkv4.shape[2]

        def grouped(value, rows=False):
            name = value.name + SUFFIX
            return op.initializer(GroupedColumns(value.const_value, heads, name, rows), name=name)

        if self.quantized:
            bits = values["qkv_product"].producer().attributes["bits"].as_int()
            product = op.WeightOnlyMatMul(x, grouped(weight, rows=True), grouped(scale), bits=bits, _domain=DOMAIN)
        else:
            product = op.MatMul(x, grouped(weight))
        q, k, v = op.Split(op.Add(product, grouped(bias)), axis=-1, num_outputs=3, _outputs=3)
        q = op.Div(op.RotaryEmbedding(q, cos, sin, positions, num_heads=heads, interleaved=0), divisor)
        k = op.RotaryEmbedding(k, cos, sin, positions, num_heads=heads, interleaved=0)
        attributes = {a.name: a for a in values["attn_out"].producer().attributes.values()}
        attention = dict(scale=attributes["scale"].as_float(), q_num_heads=heads, kv_num_heads=heads,
                         softmax_precision=attributes["softmax_precision"].as_int())
        if self.with_past:
            return op.Attention(q, k, v, mask, past_k, past_v, **attention, _outputs=3)
        heads_4d = op.Constant(value_ints=[0, 0, heads, -1])  # [b, s, h] -> [b, s, heads, hd]
        cache = [op.Transpose(op.Reshape(t, heads_4d), perm=[0, 2, 1, 3]) for t in (k, v)]
        return op.Attention(q, k, v, mask, **attention), *cache


def run(model: ir.Model, target: Target) -> PassOutcome:
    outcome = PassOutcome(NAME)
    if not (target.fused_attention and target.fused_rotary):
        outcome.declined.append(f"target {target.name} has no fused attention to reshape")
        return outcome
    rules = [Attention3D.rule(outcome, with_past=past, quantized=quantized)
             for past in (True, False) for quantized in (False, True)]
    pattern.RewriteRuleSet(rules).apply_to_model(model)
    return outcome
