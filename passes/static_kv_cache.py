"""Write the KV cache in place: the fused attention with a concatenated cache becomes
com.microsoft GroupQueryAttention over static buffers.

Pattern: Attention(q, k, v, keep, past_k, past_v) -> (out, present_k, present_v) on
[b, s, hidden] tensors (what fuse_attention and attention_3d leave), where the pasts
are graph inputs and the presents graph outputs.
Check: q, k and v are 3-D (head counts given), the mask boolean, the softmax in FP32, equal head counts
(GLM has no grouped heads); otherwise decline with the reason.
Rewrite: GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total, bias) with
causal=0 and the same scale, where total = the mask's key count (past + new),
seqlens_k = total - 1 for every row, and bias = 0 where `keep`, the dtype's lowest
value elsewhere. Its contract differs from Attention's: past_key_i / past_value_i are
buffers [b, heads, capacity, hd] (capacity >= total) that the runtime binds as the
present outputs too, so the op writes the new keys and values at [total - s, total)
in place and reads only [0, total): no copy of the past per step. The scores are the
same dot products (q already divided by sqrt(hd) * (layer + 1), scaled back by
`scale`), masked by an additive bias instead of a boolean (the same softmax for every
row with a visible key, which glmc's runtime always builds); GroupQueryAttention
computes its softmax in FP32 on CPU and CUDA.

ONNX Runtime (1.32) takes more than one new token over a past only for batch 1: the
backend runs such calls row by row (generation's steps are one token).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from glmc.passes.base import PassOutcome, Target

NAME = "static_kv_cache"
MICROSOFT = "com.microsoft"
FLOAT = ir.DataType.FLOAT.value


def is_static_attention(node: ir.Node) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == MICROSOFT


def check(node: ir.Node) -> str | None:
    """Why `node` (an Attention with a past) cannot become GroupQueryAttention, or None."""
    q, k, v, keep, past_k, past_v = (list(node.inputs) + [None] * 6)[:6]
    if len(node.outputs) != 3 or past_k is None or past_v is None:
        return f"{node.name}: no past keys and values"
    # Attention takes 3-D [batch, seq, hidden] inputs with its head counts as attributes.
    if node.attributes.get("q_num_heads") is None or node.attributes.get("kv_num_heads") is None:
        return f"{node.name}: q, k and v are not 3-D [batch, seq, hidden] tensors"
    if keep is None or not (keep.dtype == ir.DataType.BOOL or _is_not(keep)):
        return f"{node.name}: the mask is not boolean"
    if not (past_k.is_graph_input() and past_v.is_graph_input()):
        return f"{node.name}: the past keys and values are not graph inputs"
    if not all(out.is_graph_output() for out in node.outputs[1:]):
        return f"{node.name}: the present keys and values are not graph outputs"
    attrs = node.attributes
    precision = attrs.get("softmax_precision")
    if precision is None or precision.as_int() != FLOAT:
        return f"{node.name}: the softmax is not computed in FP32"
    if attrs["q_num_heads"].as_int() != attrs["kv_num_heads"].as_int():
        return f"{node.name}: grouped heads"
    if attrs.get("is_causal") is not None and attrs["is_causal"].as_int():
        return f"{node.name}: a causal attention (GLM's masks are given)"
    return None


def _is_not(value: ir.Value) -> bool:
    """A Not's output (fuse_attention's `keep`, whose type the rewriter leaves unset) is boolean."""
    producer = value.producer()
    return producer is not None and producer.op_type == "Not" and producer.domain == ""


class _Shared:
    """The inputs every layer's GroupQueryAttention shares, built once per mask."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.before: ir.Node | None = None  # the node the new ones go before (the first that needs them)
        self.made: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}

    def _add(self, op_type: str, inputs, dtype: ir.DataType, name: str, **attributes) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes, name=f"static_kv_cache_{name}")
        node.outputs[0].name = f"static_kv_cache_{name}"
        node.outputs[0].type = ir.TensorType(dtype)
        self.graph.insert_before(self.before, node)
        return node.outputs[0]

    def _constant(self, value: np.ndarray, name: str) -> ir.Value:
        existing = self.graph.initializers.get(f"static_kv_cache_{name}")
        if existing is not None:
            return existing
        tensor = ir.tensor(value, name=f"static_kv_cache_{name}")
        constant = ir.Value(name=tensor.name, shape=ir.Shape(value.shape), type=ir.TensorType(tensor.dtype),
                            const_value=tensor)
        self.graph.register_initializer(constant)
        return constant

    def inputs_for(self, keep: ir.Value, q: ir.Value, dtype: ir.DataType,
                   before: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value]:
        key = id(keep)
        if key not in self.made:
            self.before = before
            n = len(self.made)
            total64 = self._add("Shape", [keep], ir.DataType.INT64, f"total64_{n}", start=3, end=4)  # [1]
            total32 = self._add("Cast", [total64], ir.DataType.INT32, f"total32_{n}", to=ir.DataType.INT32.value)
            total = self._add("Squeeze", [total32], ir.DataType.INT32, f"total_{n}")  # a scalar
            last = self._add("Sub", [total32, self._constant(np.array([1], np.int32), "one")],
                             ir.DataType.INT32, f"last_{n}")
            # The batch from the token ids (one node for every layer), else from this layer's q.
            tokens = next((i for i in self.graph.inputs if i.name == "tokens"), q)
            batch = self._add("Shape", [tokens], ir.DataType.INT64, f"batch_{n}", start=0, end=1)
            seqlens = self._add("Expand", [last, batch], ir.DataType.INT32, f"seqlens_{n}")
            numpy_dtype = dtype.numpy()
            zero = self._constant(np.zeros((), numpy_dtype), f"zero_{dtype.name}")
            lowest = self._constant(np.array(np.finfo(numpy_dtype).min, numpy_dtype), f"lowest_{dtype.name}")
            bias = self._add("Where", [keep, zero, lowest], dtype, f"bias_{n}")
            self.made[key] = (seqlens, total, bias)
        return self.made[key]


def rewrite(graph: ir.Graph, node: ir.Node, shared: _Shared) -> None:
    q, k, v, keep, past_k, past_v = node.inputs[:6]
    # The rewriters leave the fused values untyped; the cache inputs carry the model dtype.
    seqlens, total, bias = shared.inputs_for(keep, q, past_k.dtype, node)
    attrs = node.attributes
    heads = attrs["q_num_heads"].as_int()
    gqa = ir.node("GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total, None, None, None, bias],
                  attributes={"num_heads": heads, "kv_num_heads": heads, "scale": attrs["scale"].as_float(),
                              "causal": 0},
                  domain=MICROSOFT, num_outputs=3, name=f"{node.name}_static")
    graph.insert_before(node, gqa)
    for old, new in zip(node.outputs, gqa.outputs):
        new.type = old.type
        new.shape = old.shape if old is node.outputs[0] else past_k.shape  # the buffers, not past + s
        if old.is_graph_output():
            index = graph.outputs.index(old)
            name = old.name
            old.name = f"{name}_concat"
            graph.outputs[index] = new
            new.name = name
        old.replace_all_uses_with(new)
    graph.remove(node, safe=True)


def run(model: ir.Model, target: Target) -> PassOutcome:
    outcome = PassOutcome(NAME)
    if not target.static_kv_cache:
        outcome.declined.append(f"target {target.name} keeps a concatenated KV cache")
        return outcome
    graph = model.graph
    attentions = [n for n in graph if n.op_type == "Attention" and n.domain == ""]
    if not attentions:
        return outcome
    # All or none: the backend binds either every layer's cache as static buffers or none.
    reasons = [reason for reason in map(check, attentions) if reason is not None]
    if reasons:
        outcome.declined.extend(reasons)
        return outcome
    shared = _Shared(graph)
    for node in attentions:
        rewrite(graph, node, shared)
        outcome.count += 1
    if outcome.count:
        imports = model.opset_imports
        imports.setdefault(MICROSOFT, 1)
    return outcome
