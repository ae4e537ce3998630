"""Fuse GeGLU into one call of the local function `glmc.GeGLU`.

Pattern: x1, x2 = Split(h, 2 equal halves, last axis); Mul(x1, Gelu(x2)) (exact GELU).
Check: two outputs, the last axis, no explicit unequal split sizes, approximate="none".
Rewrite: GeGLU(h) in domain "glmc", a model-local function whose body is that same
Split/Gelu/Mul: a backend without a GeGLU kernel inlines it, one with a kernel can
match the node. Not produced for TensorRT, which reads the primitives directly.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from glmc.passes.base import PassOutcome, Target

NAME = "fuse_geglu"
DOMAIN, FUNCTION = "glmc", "GeGLU"


def geglu_function() -> ir.Function:
    """y = x1 * gelu(x2) with x1, x2 the halves of x's last axis."""
    x = ir.Value(name="x")
    split = ir.node("Split", [x], attributes={"axis": -1, "num_outputs": 2}, num_outputs=2, name="halves")
    gelu = ir.node("Gelu", [split.outputs[1]], attributes={"approximate": "none"}, name="gelu")
    mul = ir.node("Mul", [split.outputs[0], gelu.outputs[0]], name="gate")
    mul.outputs[0].name = "y"
    graph = ir.Graph([x], mul.outputs, nodes=[split, gelu, mul], opset_imports={"": 23}, name=FUNCTION)
    return ir.Function(DOMAIN, FUNCTION, graph=graph, attributes=[])


class GeGLUFusion(pattern.RewriteRuleClassBase):
    def __init__(self, outcome: PassOutcome):
        super().__init__(name="GLMGeGLU")
        self.outcome = outcome

    def pattern(self, op, h):
        x1, x2 = op.Split(h, _outputs=["x1", "x2"])
        return op.Mul(x1, op.Gelu(x2, _outputs=["gelu"]))

    def check(self, context, h, x1, gelu, **_) -> pattern.MatchResult:
        reason = self.why_not(h, x1, gelu)
        if reason:
            self.outcome.declined.append(reason)
            return pattern.MatchResult().fail(reason)
        return pattern.MatchResult()

    @staticmethod
    def why_not(h, x1, gelu) -> str | None:
        split = x1.producer()
        if len(split.inputs) > 1 and split.inputs[1] is not None:
            return f"{split.name}: explicit split sizes"
        axis = split.attributes.get("axis")
        rank = len(h.shape) if h.shape is not None else None
        if axis is None or rank is None or axis.as_int() not in (-1, rank - 1):
            return f"{split.name}: not a split of the last axis"
        approximate = gelu.producer().attributes.get("approximate")
        if approximate is not None and approximate.as_string() != "none":
            return f"{gelu.producer().name}: tanh-approximated GELU, GLM uses the exact one"
        return None

    def rewrite(self, op, h, **_):
        self.outcome.count += 1
        return op.GeGLU(h, _domain=DOMAIN, _version=1)


def run(model: ir.Model, target: Target) -> PassOutcome:
    outcome = PassOutcome(NAME)
    if not target.geglu_function:
        outcome.declined.append(f"target {target.name} keeps GeGLU as Split + Gelu + Mul")
        return outcome
    pattern.RewriteRuleSet([GeGLUFusion.rule(outcome)]).apply_to_model(model)
    if outcome.count:
        function = geglu_function()
        model.functions[function.identifier()] = function
        model.opset_imports.setdefault(DOMAIN, 1)
    return outcome
