"""Clean-up: constant folding, common subexpressions, dead code, unused functions.

Run before the fusions (so that their patterns meet folded constants and plain
Splits instead of the exporter's sequences) and after them (to drop what the
fusions left unused and merge their repeated `Not(mask)`). Large weights are
never folded: the size limits keep constant folding to small tensors.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

from glmc.passes.base import PassOutcome, Target

NAME = "cleanup"


def run(model: ir.Model, target: Target) -> PassOutcome:
    before = sum(1 for _ in model.graph.all_nodes())
    onnxscript.optimizer.optimize(model, num_iterations=2, input_size_limit=1024, output_size_limit=1 << 16,
                                  inline=False)
    common.CommonSubexpressionEliminationPass()(model)
    common.RemoveUnusedNodesPass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    after = sum(1 for _ in model.graph.all_nodes())
    return PassOutcome(NAME, count=max(before - after, 0))
