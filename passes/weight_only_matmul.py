"""Weight-only int8/int4 matmuls: GLM-130B's codes and per-row scales, read by the target's op.

The traced graph of a quantized model holds one `glmc.WeightOnlyMatMul(x, q, scale; bits)`
per quantized linear (`glmc.model.quantized`): `x @ (half(q) * scale)^T` with GLM's codes
q (int8 [N, K], or [N, K / 2] two int4 per byte, even column high) and fp16 scales [N].
No backend runs that op: this pass lowers every one of them, storing the codes and
scales in the layout the replacing op reads (`glmc.quantization`), computed lazily
while the package is written. Never a float copy of the weight.

Pattern: `glmc.WeightOnlyMatMul` with constant codes and scales.
Check (for `com.microsoft.MatMulNBits`): the target runs com.microsoft ops and the
activations are float32 or float16 (MatMulNBits' types); otherwise the match is
declined with the reason and lowered to the standard form instead.
Rewrite:
* `MatMulNBits(x, B, scales; K, N, bits, block_size, accuracy_level=0)`: GLM's per-row
  scale repeated for every block, codes shifted by the zero point 2^(bits-1), scales in
  the activations' dtype (exact: an fp16 value). accuracy_level 0 keeps the activations
  in float (ONNX Runtime would quantize them to int8 at level 4). The dequantized weight
  is q * scale, not rounded to fp16 as GLM's kernel rounds it (2^-11 of a weight at most).
* otherwise `DequantizeLinear(q^T, scale)` (int8 per output channel, or INT4 with
  block-wise scales along K) -> fp16 `half(q) * scale`, exactly GLM's kernel -> `Cast` to
  the activations' dtype (none in fp16) -> `MatMul`: the weight-only form TensorRT fuses.
A quantized matmul that cannot be lowered at all (codes or scales computed, a bit width
other than 4 or 8, odd widths for int4) stops the export with one error naming the node.

Runs after the cleanups: constant folding would evaluate a small dequantization of
constants into a float initializer (glm-tiny at TP 8), which is the copy this pass avoids.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from glmc.graphs.trace import ExportError
from glmc.model.quantized import DOMAIN, OP
from glmc.passes.base import PassOutcome, Target
from glmc.quantization import (
    SUPPORTED_BITS,
    block_size_for,
    blocks_of,
    block_scales,
    dequantize_linear_layout,
    dequantize_linear_scales,
    matmul_nbits_layout,
)

NAME = "weight_only_matmul"
MICROSOFT = "com.microsoft"
NBITS_SUFFIX = ".nbits"  # stored for MatMulNBits (package.STORAGE_FORMS)
DQ_SUFFIX = ".dq"  # stored for DequantizeLinear
NBITS_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)  # MatMulNBits' activation types (T1)
_ROWS_PER_CHUNK = 4096


class StoredLayout(ir.LazyTensor):
    """A weight in a graph's layout, computed from GLM's codes or scales only when read.

    `layout(rows)` maps a block of the source's rows (output rows N, GLM's layout) to the
    stored layout; `axis` is the stored axis those rows land on (0 for MatMulNBits, 1 for
    the transposed DequantizeLinear codes). `chunks` yields the stored bytes a block at a
    time, so that the package writer never holds a second whole copy."""

    def __init__(self, source: ir.TensorProtocol, layout, dtype: ir.DataType, shape: list[int], name: str,
                 axis: int = 0):
        super().__init__(self._compute, dtype=dtype, shape=ir.Shape(shape), name=name)
        self.source, self.layout, self.axis = source, layout, axis

    def _stored(self) -> np.ndarray:
        return np.ascontiguousarray(self.layout(self.source.numpy()))

    def _compute(self) -> ir.TensorProtocol:
        stored = self._stored()
        if self.dtype in (ir.DataType.INT4, ir.DataType.UINT4):
            return ir.PackedTensor(stored, self.dtype, shape=self.shape, name=self.name)
        return ir.tensor(stored, dtype=self.dtype, name=self.name)

    def chunks(self):
        if self.axis == 0:  # rows map to rows: one block of source rows at a time
            source = self.source.numpy()
            for start in range(0, source.shape[0], _ROWS_PER_CHUNK):
                yield np.ascontiguousarray(self.layout(source[start:start + _ROWS_PER_CHUNK])).view(np.uint8)
        else:
            yield self._stored().view(np.uint8)


def check(node: ir.Node, target: Target) -> str | None:
    """Why this quantized matmul does not become MatMulNBits, or None."""
    if not target.microsoft_ops:
        return f"{node.name}: target {target.name} has no com.microsoft ops: DequantizeLinear + MatMul"
    dtype = node.inputs[0].dtype
    if dtype not in NBITS_TYPES:
        name = dtype.name if dtype is not None else "unknown"
        return (f"{node.name}: {name} activations, MatMulNBits takes FLOAT and FLOAT16: "
                "DequantizeLinear + MatMul")
    return None


def _operands(node: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value, int, int, int]:
    """x, codes, scale, bits, N, K of a `glmc.WeightOnlyMatMul`, or an ExportError naming the node."""
    if len(node.inputs) != 3 or any(v is None for v in node.inputs):
        raise ExportError(f"{node.name}: {DOMAIN}.{OP} takes x, codes and scales")
    x, codes, scale = node.inputs
    bits_attr = node.attributes.get("bits")
    bits = bits_attr.as_int() if bits_attr is not None else None
    if bits not in SUPPORTED_BITS:
        raise ExportError(f"{node.name}: quantization bit width must be 4 or 8, got {bits}")
    for value in (codes, scale):
        if value.const_value is None or value.shape is None or not value.is_initializer():
            raise ExportError(f"{node.name}: {value.name} is not a stored weight; a quantized matmul needs "
                              "constant codes and scales")
    if len(codes.shape) != 2 or codes.dtype != ir.DataType.INT8:
        raise ExportError(f"{node.name}: codes {codes.name} must be a 2-D int8 tensor, got "
                          f"{codes.dtype} {list(codes.shape)}")
    n, k = codes.shape[0], codes.shape[1] * 8 // bits
    if list(scale.shape) != [n] or scale.dtype != ir.DataType.FLOAT16:
        raise ExportError(f"{node.name}: scales {scale.name} must be float16 [{n}], got {scale.dtype} "
                          f"{list(scale.shape)}")
    if bits == 4 and n % 2:
        raise ExportError(f"{node.name}: int4 stores two codes per byte: {n} output rows is odd")
    x_k = x.shape[-1] if x.shape is not None and len(x.shape) else None
    if isinstance(x_k, int) and x_k != k:
        raise ExportError(f"{node.name}: x has {x_k} features, the codes {codes.name} hold {k} columns")
    return x, codes, scale, bits, n, k


def _initializer(graph: ir.Graph, lazy: StoredLayout) -> ir.Value:
    if lazy.name in graph.initializers:  # a weight read by two matmuls is stored once
        return graph.initializers[lazy.name]
    value = ir.Value(name=lazy.name, shape=lazy.shape, type=ir.TensorType(lazy.dtype), const_value=lazy)
    graph.register_initializer(value)
    return value


def _matmul_nbits(graph, node, x, codes, scale, bits, n, k) -> list[ir.Node]:
    nbits = StoredLayout(codes.const_value, lambda c: matmul_nbits_layout(c, bits), ir.DataType.UINT8,
                         [n, blocks_of(k), block_size_for(k) * bits // 8], codes.name + NBITS_SUFFIX)
    dtype = x.dtype
    scales = StoredLayout(scale.const_value, lambda s: block_scales(s, k).astype(dtype.numpy()), dtype,
                          [n * blocks_of(k)], scale.name + NBITS_SUFFIX)
    matmul = ir.node("MatMulNBits", [x, _initializer(graph, nbits), _initializer(graph, scales)],
                     attributes={"K": k, "N": n, "bits": bits, "block_size": block_size_for(k), "accuracy_level": 0},
                     domain=MICROSOFT, name=f"{node.name}_nbits")
    return [matmul]


def _dequantize_linear(graph, node, x, codes, scale, bits, n, k) -> list[ir.Node]:
    if bits == 8:
        q = StoredLayout(codes.const_value, lambda c: dequantize_linear_layout(c, 8), ir.DataType.INT8,
                         [k, n], codes.name + DQ_SUFFIX, axis=1)
        s = StoredLayout(scale.const_value, lambda v: dequantize_linear_scales(v, k, 8), ir.DataType.FLOAT16,
                         [n], scale.name + DQ_SUFFIX)
        attributes = {"axis": 1}
    else:
        q = StoredLayout(codes.const_value, lambda c: dequantize_linear_layout(c, 4), ir.DataType.INT4,
                         [k, n], codes.name + DQ_SUFFIX, axis=1)
        s = StoredLayout(scale.const_value, lambda v: dequantize_linear_scales(v, k, 4), ir.DataType.FLOAT16,
                         [blocks_of(k), n], scale.name + DQ_SUFFIX, axis=1)
        attributes = {"axis": 0, "block_size": block_size_for(k)}
    dq = ir.node("DequantizeLinear", [_initializer(graph, q), _initializer(graph, s)], attributes=attributes,
                 name=f"{node.name}_dequantize")
    weight = dq.outputs[0]
    weight.type, weight.shape = ir.TensorType(ir.DataType.FLOAT16), ir.Shape([k, n])
    nodes = [dq]
    if x.dtype != ir.DataType.FLOAT16:
        cast = ir.node("Cast", [weight], attributes={"to": x.dtype}, name=f"{node.name}_cast")
        cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(x.dtype), ir.Shape([k, n])
        nodes.append(cast)
        weight = cast.outputs[0]
    nodes.append(ir.node("MatMul", [x, weight], name=f"{node.name}_matmul"))
    return nodes


def run(model: ir.Model, target: Target) -> PassOutcome:
    outcome = PassOutcome(NAME)
    graph = model.graph
    for node in graph.all_nodes():
        if node.domain == DOMAIN and node.op_type == OP and node.graph is not graph:
            raise ExportError(f"{node.name}: a quantized matmul inside a subgraph or function")
    matches = [n for n in graph if n.domain == DOMAIN and n.op_type == OP]
    if matches and not target.microsoft_ops:  # one reason for the whole graph
        outcome.declined.append(f"target {target.name} has no com.microsoft ops: {len(matches)} quantized "
                                "matmuls as DequantizeLinear + MatMul")
    replaced: set[ir.Value] = set()
    for node in matches:
        x, codes, scale, bits, n, k = _operands(node)
        if x.dtype is None:
            raise ExportError(f"{node.name}: the dtype of its input {x.name} is unknown")
        reason = check(node, target)
        if reason is None:
            nodes = _matmul_nbits(graph, node, x, codes, scale, bits, n, k)
            model.opset_imports.setdefault(MICROSOFT, 1)
            outcome.count += 1
        else:
            nodes = _dequantize_linear(graph, node, x, codes, scale, bits, n, k)
            if target.microsoft_ops:
                outcome.declined.append(reason)
        out = nodes[-1].outputs[0]
        out.type, out.shape = node.outputs[0].type, node.outputs[0].shape
        graph.insert_before(node, nodes)
        node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        replaced.update((codes, scale))
    for value in replaced:  # GLM's own layout: nothing reads it any more
        if not value.uses():
            graph.initializers.pop(value.name, None)
    if not any(n.domain == DOMAIN for n in graph.all_nodes()):
        model.opset_imports.pop(DOMAIN, None)
    return outcome
