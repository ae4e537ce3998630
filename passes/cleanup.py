"""Clean-up: constant folding, common subexpressions, dead code, unused functions.

Run before the fusions (so that their patterns meet folded constants and plain
Splits instead of the exporter's sequences) and after them (to drop what the
fusions left unused and merge their repeated `Not(mask)`). Large weights are
never folded: the size limits keep constant folding to small tensors.

This is onnxscript's optimizer with a chosen set of its simplification rules.
Those rules are module-level objects that keep a reference to the last graph they
matched, which would keep a rank's weights alive while the next rank is exported:
each run works on fresh copies of them.
"""

from __future__ import annotations

import copy
import re

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as rules

from glmc.passes.base import PassOutcome, Target

NAME = "cleanup"
_INPUT_LIMIT = 1024  # elements: fold shape arithmetic and scalars, never a weight
_OUTPUT_LIMIT = 1 << 16
# What the exporter leaves around reshapes, casts and no-op arithmetic.
_RULES = (rules.reshape_reshape_rule, rules.squeeze_reshape_1d_rule, rules.materialize_reshape_shape_rule,
          rules.unsqueeze_unsqueeze_rule, rules.transpose_transpose_rule, rules.no_op_transpose_rule,
          rules.no_op_cast_rule, rules.cast_cast_rule, rules.no_op_expand_rule, rules.mul_by_1_rule,
          rules.div_by_1_rule, rules.add_0_rule, rules.sub_0_rule, rules.collapse_slice_rule, rules.slice_split_rule)


def run(model: ir.Model, target: Target) -> PassOutcome:
    before = sum(1 for _ in model.graph.all_nodes())
    for _ in range(2):
        onnxscript.optimizer.fold_constants(model, input_size_limit=_INPUT_LIMIT, output_size_limit=_OUTPUT_LIMIT)
        pattern.RewriteRuleSet(copy.deepcopy(list(_RULES))).apply_to_model(model)
        common.RemoveUnusedNodesPass()(model)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    # Equal small constants become one initializer, so that CSE can merge the nodes reading
    # them (the shape arithmetic each layer repeats).
    deduplicate_constants(model.graph)
    common.CommonSubexpressionEliminationPass()(model)
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    common.RemoveUnusedOpsetsPass()(model)
    after = sum(1 for _ in model.graph.all_nodes())
    return PassOutcome(NAME, count=max(before - after, 0))


_EXPORTER_CONSTANT = re.compile(r"^val_\d+$")  # how torch.onnx names the constants it creates


def deduplicate_constants(graph: ir.Graph) -> None:
    """Merge equal small constants of the exporter's. Never a model parameter, however small
    and whatever its value: a freshly initialised LayerNorm's weight equals every other one,
    and each must stay under its own name for the package's parameter map."""
    seen: dict[tuple, ir.Value] = {}
    for value in tuple(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or not _EXPORTER_CONSTANT.match(value.name or "") or tensor.size > _INPUT_LIMIT:
            continue
        key = (tensor.dtype, tuple(tensor.shape), tensor.tobytes())
        if key in seen:
            value.replace_all_uses_with(seen[key])
            graph.initializers.pop(value.name)
        else:
            seen[key] = value
