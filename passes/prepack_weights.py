"""Store each weight once, in the layout its matmul reads: fold `Transpose(W)` into `W.T`.

Pattern: an initializer W [out, in] whose every use is `Transpose(W, perm=[1, 0])`,
or `Gather(W, ids, axis=0)` (the tied embedding is both looked up and used as the
output projection).
Check: no other use, 2-D, perm [1, 0]; otherwise decline with the reason.
Rewrite: a lazily transposed initializer `W.T` [in, out] replaces the transposes;
a lookup becomes `Transpose(Gather(W.T, ids, axis=1))`. The transposed data is
computed one tensor at a time when the package is written, so the export never
holds two copies of the weights, and ONNX Runtime has no transposes to fold (and
copy) when it loads them.

The tied embedding on the ONNX Runtime target is the one exception: it is stored twice,
W [vocab, hidden] for the lookups, which read its rows, and `W.T` for the output
projection, which ONNX Runtime prepacks and then releases. A lookup in W.T would read
one element per page and, over a generation, page the whole table back in beside the
packed copy; a projection reading W itself would keep W's pages resident beside it.
(One extra copy on disk: 1.4% of a GLM-130B rank; none in memory.)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from glmc.passes.base import PassOutcome, Target

NAME = "prepack_weights"
SUFFIX = ".T"


def _is_transpose_2d(node: ir.Node) -> bool:
    perm = node.attributes.get("perm")
    return node.op_type == "Transpose" and node.domain == "" and perm is not None and list(perm.as_ints()) == [1, 0]


def _is_row_lookup(node: ir.Node, index: int) -> bool:
    axis = node.attributes.get("axis")
    return node.op_type == "Gather" and node.domain == "" and index == 0 and (axis is None or axis.as_int() == 0)


def check(weight: ir.Value) -> str | None:
    """Why `weight` cannot be stored transposed, or None."""
    uses = list(weight.uses())
    if weight.shape is None or len(weight.shape) != 2:
        return f"{weight.name}: not a 2-D weight"
    if not any(_is_transpose_2d(use.node) for use in uses):
        return f"{weight.name}: no Transpose reads it"
    for use in uses:
        if not (_is_transpose_2d(use.node) or _is_row_lookup(use.node, use.idx)):
            return f"{weight.name}: also read by {use.node.op_type} (input {use.idx})"
    return None


class TransposedWeight(ir.LazyTensor):
    """`source` transposed, computed only when read; `chunks` yields it a block of rows at a time."""

    def __init__(self, source: ir.TensorProtocol, name: str):
        rows, cols = source.shape
        super().__init__(self._compute, dtype=source.dtype, shape=ir.Shape([cols, rows]), name=name)
        self.source = source

    def _compute(self) -> ir.TensorProtocol:
        return ir.tensor(np.ascontiguousarray(self.source.numpy().T), name=self.name)

    def chunks(self, max_bytes: int = 64 << 20):
        """Contiguous row blocks of the transposed weight, each at most about `max_bytes`."""
        source = self.source.numpy()  # a view of the original storage, not a copy
        rows, cols = source.shape
        step = max(1, max_bytes // max(1, rows * source.itemsize))
        for start in range(0, cols, step):
            yield np.ascontiguousarray(source[:, start:start + step].T)


def _transposed(weight: ir.Value) -> ir.Value:
    rows, cols = weight.shape
    lazy = TransposedWeight(weight.const_value, name=weight.name + SUFFIX)
    return ir.Value(name=weight.name + SUFFIX, shape=ir.Shape([cols, rows]), type=ir.TensorType(lazy.dtype),
                    const_value=lazy)


def rewrite(graph: ir.Graph, weight: ir.Value) -> None:
    transposed = _transposed(weight)
    graph.register_initializer(transposed)
    for use in list(weight.uses()):
        node = use.node
        if _is_transpose_2d(node):
            node.outputs[0].replace_all_uses_with(transposed)
            graph.remove(node, safe=True)
            continue
        ids = node.inputs[1]  # Gather(W, ids) [.., in]  ==  Transpose(Gather(W.T, ids, axis=1))
        rank = len(ids.shape) if ids.shape is not None else None
        if rank is None:
            raise ValueError(f"{node.name}: lookup ids of unknown rank")
        gather = ir.node("Gather", [transposed, ids], attributes={"axis": 1}, name=f"{node.name}_columns")
        move = ir.node("Transpose", gather.outputs, attributes={"perm": [*range(1, rank + 1), 0]},
                       name=f"{node.name}_rows")
        move.outputs[0].shape, move.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        graph.insert_before(node, [gather, move])
        node.outputs[0].replace_all_uses_with(move.outputs[0])
        graph.remove(node, safe=True)
    graph.initializers.pop(weight.name)


def is_lookup_table(weight: ir.Value) -> bool:
    """Read by a row lookup too (the tied embedding), not only by transposes."""
    return any(_is_row_lookup(use.node, use.idx) for use in weight.uses())


def rewrite_tied(graph: ir.Graph, weight: ir.Value) -> None:
    """Keep W for its lookups; its transposes (the output projection) read `W.T`."""
    transposed = _transposed(weight)
    graph.register_initializer(transposed)
    for use in list(weight.uses()):
        if _is_transpose_2d(use.node):
            use.node.outputs[0].replace_all_uses_with(transposed)
            graph.remove(use.node, safe=True)


def run(model: ir.Model, target: Target) -> PassOutcome:
    outcome = PassOutcome(NAME)
    graph = model.graph
    for weight in list(graph.initializers.values()):
        if weight.const_value is None or not weight.uses():
            continue
        reason = check(weight)
        if reason is None and target.microsoft_ops and is_lookup_table(weight):
            rewrite_tied(graph, weight)
            outcome.count += 1
            continue
        if reason is None:
            rewrite(graph, weight)
            outcome.count += 1
        elif weight.shape is not None and len(weight.shape) == 2 and "no Transpose" not in reason:
            outcome.declined.append(reason)
    return outcome
