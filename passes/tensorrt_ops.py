"""Guard that TensorRT's ONNX parser would take every node of a `tensorrt`-target graph.

Pattern: every node of the graph (subgraphs and local-function bodies included).
Check: its op is in TensorRT's published ONNX operator table (`data/onnx_tensorrt_operators.json`,
the onnx-tensorrt support matrix, with its source and release) and its data tensors have
a dtype the table lists for that op; `glmc.AllReduce` is allowed, since the TensorRT
backend lowers it (a collective layer in the engine, or a cut between engines); any other
custom domain (com.microsoft...) is refused. A node that fails stops the export with
one error naming the node, its op and what TensorRT lacks, so that a package TensorRT
cannot build never appears.
Rewrite: none; the count is the number of nodes checked. Tensors whose dtype the graph
does not record are listed as declined (reported in the manifest), not refused: the
parser may still take them.

Which tensors a table row's types refer to: those bound to the op's data type parameter,
i.e. the type parameter (in the op's ONNX schema) of its first input that admits a
floating-point type, else of its first input. Index, shape and condition operands (Gather's
indices, Reshape's shape, Where's condition) are thereby not held to the data types, and
DequantizeLinear's row (INT8, FP8, INT4) is held against its quantized input `x`, as the
table means it (weight-only int8/int4 arrive as DequantizeLinear feeding MatMul).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from glmc.errors import GlmcError
from glmc.graphs.ops import ALL_REDUCE, DOMAIN
from glmc.passes.base import PassOutcome, Target

NAME = "tensorrt_ops"
ONLY_FOR = ("tensorrt",)  # passes.optimize runs this pass for these targets only
TABLE = Path(__file__).parent / "data" / "onnx_tensorrt_operators.json"
STANDARD_DOMAINS = ("", "ai.onnx")
ALLOWED_CUSTOM = {(DOMAIN, ALL_REDUCE)}  # lowered by the TensorRT backend itself


class UnsupportedByTensorRT(GlmcError):
    """A node of a `tensorrt`-target graph that TensorRT's ONNX parser would reject."""


@dataclass(frozen=True)
class OperatorTable:
    release: str
    source: str
    types: dict[str, frozenset[str]]  # op -> ONNX dtype names (FLOAT, FLOAT16...) it takes
    unsupported: frozenset[str]


@functools.lru_cache(maxsize=1)
def operator_table(path: Path = TABLE) -> OperatorTable:
    data = json.loads(path.read_text(encoding="utf-8"))  # shipped with glmc, not user input
    names = data["onnx_types"]
    types = {op: frozenset(names[t] for t in listed) for op, listed in data["supported"].items()}
    return OperatorTable(data["release"], data["source"], types, frozenset(data["unsupported"]))


def _is_floating(type_str: str) -> bool:
    return "float" in type_str or "double" in type_str


def data_operands(node: ir.Node, opset: int) -> list[ir.Value] | None:
    """The inputs and outputs of `node` that the table's types refer to (None: no schema known)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return None
    constraints = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    formal_inputs = [p.type_str for p in schema.inputs]
    if not formal_inputs:
        return []
    chosen = next((t for t in formal_inputs if any(_is_floating(s) for s in constraints.get(t, ()))),
                  formal_inputs[0])
    if chosen not in constraints:  # a fixed type such as tensor(int64): nothing polymorphic to check
        return []

    def bound(values, formals) -> list[ir.Value]:
        out = []
        for index, value in enumerate(values):
            if value is None:
                continue
            formal = formals[min(index, len(formals) - 1)] if formals else None  # variadic: the last one repeats
            if formal is not None and formal.type_str == chosen:
                out.append(value)
        return out

    return bound(node.inputs, list(schema.inputs)) + bound(node.outputs, list(schema.outputs))


def check_op(node: ir.Node, table: OperatorTable, functions: set[tuple[str, str]]) -> bool:
    """Refuse an op TensorRT's parser lacks; False for the ops whose dtypes are not the table's
    business (glmc.AllReduce, calls of the graph's local functions)."""
    key = (node.domain, node.op_type)
    if key in ALLOWED_CUSTOM or key in functions:
        return False
    if node.domain not in STANDARD_DOMAINS:
        raise UnsupportedByTensorRT(
            f"{describe(node)}: TensorRT's ONNX parser has no ops of domain '{node.domain}' ({table.release}); "
            "a tensorrt-target graph must hold standard ONNX ops only")
    if node.op_type not in table.types:
        status = "lists as unsupported" if node.op_type in table.unsupported else "does not list"
        raise UnsupportedByTensorRT(f"{describe(node)}: TensorRT's ONNX operator table ({table.release}) "
                                    f"{status} {node.op_type} (see {table.source})")
    return True


def check_dtypes(node: ir.Node, opset: int, table: OperatorTable, declined: list[str]) -> None:
    operands = data_operands(node, opset)
    if operands is None:
        declined.append(f"{node.name}: no ONNX schema for {node.op_type}, dtypes unchecked")
        return
    accepted = table.types[node.op_type]
    for value in operands:
        if value.dtype is not None and value.dtype.name not in accepted:
            raise UnsupportedByTensorRT(
                f"{describe(node)}: '{value.name}' is {value.dtype.name}, TensorRT's {node.op_type} takes "
                f"{', '.join(sorted(accepted))} ({table.release})")
    # One type parameter binds one dtype: a single known operand speaks for the others.
    if operands and all(value.dtype is None for value in operands):
        declined.append(f"{node.name}: dtype of {', '.join(repr(v.name) for v in operands)} unknown, unchecked")


def describe(node: ir.Node) -> str:
    return f"node '{node.name}' ({(node.domain + '.') if node.domain else ''}{node.op_type})"


def run(model: ir.Model, target: Target) -> PassOutcome:
    outcome = PassOutcome(NAME)
    table = operator_table()
    functions = {(f.domain, f.name) for f in model.functions.values()}
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
    for node in model.graph.all_nodes():
        if check_op(node, table, functions):
            check_dtypes(node, opset, table, outcome.declined)
        outcome.count += 1
    for function in model.functions.values():  # bodies: their ops; dtypes are bound per call
        for node in function:
            check_op(node, table, functions)
    return outcome
