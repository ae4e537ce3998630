"""glmc's own graph ops: the tensor-parallel collectives a rank graph carries.

`glmc.AllReduce` (domain "glmc") sums its input over the tensor-parallel group.
Each backend lowers it: torch with `dist.all_reduce`, ONNX Runtime by running the
graph in segments cut at these nodes, TensorRT with its NCCL collective layer.
In PyTorch it is the custom op `glmc::all_reduce`, so that torch.export keeps it
as one node; its eager body is the identity (a single process holds the whole sum).
"""

from __future__ import annotations

import onnx
import torch
from onnx.defs import OpSchema

DOMAIN = "glmc"
ALL_REDUCE = "AllReduce"

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _register_schema() -> None:
    # With a schema, onnxscript can emit the op and onnx's checker and shape
    # inference know its output has its input's type and shape.
    try:
        onnx.defs.get_schema(ALL_REDUCE, 1, DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    schema = OpSchema(
        ALL_REDUCE, DOMAIN, 1,
        doc="Element-wise sum of `input` over every rank of the tensor-parallel group.",
        inputs=[OpSchema.FormalParameter("input", "T")],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", _FLOATS, "floating-point tensors")],
    )
    onnx.defs.register_schema(schema)


_register_schema()


@torch.library.custom_op("glmc::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def onnx_all_reduce(x):
    """Translation of `glmc::all_reduce` for torch.onnx.export."""
    import onnxscript

    return onnxscript.values.Opset(DOMAIN, 1).AllReduce(x)


class ExportCollectives:
    """What a rank graph records for its peers: AllReduce nodes; logits stay vocab-parallel
    (the runtime gathers them), so there is no all-gather in the graph."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.glmc.all_reduce(x)

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return x
