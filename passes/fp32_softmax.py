"""Keep every softmax in FP32, as GLM-130B does, whatever the graph's dtype.

Pattern: a Softmax whose input is not FLOAT, or an Attention without
softmax_precision = FLOAT.
Check: the input dtype is known (an unknown dtype is declined and reported).
Rewrite: Cast to FLOAT before the Softmax and back to its dtype after; set
Attention's softmax_precision to FLOAT. The reference model already upcasts, so
a graph traced from it needs no rewrite here: the pass guards the rule for any
graph, and `softmax_dtypes` lets tests and `glmc inspect` show that it holds.
"""

from __future__ import annotations

import onnx_ir as ir

from glmc.passes.base import PassOutcome, Target

NAME = "fp32_softmax"
FLOAT = ir.DataType.FLOAT


def softmax_dtypes(model: ir.Model) -> list[str]:
    """The precision of every softmax in the graph: Softmax input dtypes and Attention's softmax_precision."""
    out = []
    for node in model.graph.all_nodes():
        if node.op_type == "Softmax" and node.domain == "":
            out.append(node.inputs[0].dtype.name if node.inputs[0].dtype is not None else "UNKNOWN")
        elif node.op_type == "Attention" and node.domain == "":
            precision = node.attributes.get("softmax_precision")
            out.append(ir.DataType(precision.as_int()).name if precision is not None else "DEFAULT")
        elif node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
            out.append("FLOAT")  # its softmax is FP32 on CPU and CUDA whatever the dtype
    return out


def run(model: ir.Model, target: Target) -> PassOutcome:
    outcome = PassOutcome(NAME)
    graph = model.graph
    for node in list(graph):
        if node.domain != "":
            continue
        if node.op_type == "Attention":
            precision = node.attributes.get("softmax_precision")
            if precision is None or precision.as_int() != FLOAT.value:
                node.attributes["softmax_precision"] = ir.AttrInt64("softmax_precision", FLOAT.value)
                outcome.count += 1
            continue
        if node.op_type != "Softmax":
            continue
        x = node.inputs[0]
        if x.dtype is None:
            outcome.declined.append(f"{node.name}: input dtype unknown")
        elif x.dtype != FLOAT:
            up = ir.node("Cast", [x], attributes={"to": FLOAT.value}, name=f"{node.name}_to_fp32")
            up.outputs[0].type, up.outputs[0].shape = ir.TensorType(FLOAT), x.shape
            graph.insert_before(node, up)
            node.replace_input_with(0, up.outputs[0])
            out = node.outputs[0]
            down = ir.node("Cast", [out], attributes={"to": x.dtype.value}, name=f"{node.name}_back")
            graph.insert_after(node, down)
            back = down.outputs[0]
            back.type, back.shape = ir.TensorType(x.dtype), out.shape
            out.type = ir.TensorType(FLOAT)
            for use in list(out.uses()):
                if use.node is not down:
                    use.node.replace_input_with(use.idx, back)
            if out.is_graph_output():  # the graph output keeps its name, now on the cast-back value
                name, out.name = out.name, f"{out.name}_fp32"
                graph.outputs[graph.outputs.index(out)] = back
                back.name = name
            outcome.count += 1
    return outcome
