"""Trace one tensor-parallel rank of the reference model into ONNX graphs.

One graph per rank, with dynamic batch, sequence, past and logit axes, serves every
call (one graph: one ONNX Runtime session or TensorRT engine, so each weight is
held once):

* step: tokens, position_ids [b, s], attention_mask [b, 1, s, past + s],
  logit_positions [r] (which of the s positions get logits: the last for a prefill,
  all for full-logit calls), past_key_i / past_value_i [b, heads / tp, past, hd]
  (an empty past for a prefill) -> logits [b, r, vocab / tp], present_key_i /
  present_value_i [b, heads / tp, past + s, hd].

This is the graph as traced, with a concatenated cache; passes may turn it into one
that writes a static cache in place (passes/static_kv_cache). Logits stay
vocab-parallel: rank r holds vocabulary rows [r * V / tp, (r + 1) * V / tp); the
runtime gathers them. Masks follow SAT: boolean, True = masked out.
"""

from __future__ import annotations

import logging
import warnings

import onnx_ir as ir
import torch
from torch import nn

from glmc.errors import GlmcError
from glmc.model import GLMModel
from glmc.model.parallel import SingleRank
from glmc.graphs.ops import ExportCollectives, all_reduce, onnx_all_reduce
from glmc.graphs.seal import GRAPHS  # the package format says which graphs a rank holds
_PARAMETER_PREFIX = "model."


class ExportError(GlmcError):
    """The traced graph would not serve every shape the runtime uses."""


class StepGraph(nn.Module):
    def __init__(self, model: GLMModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, position_ids, attention_mask, logit_positions, past_keys, past_values):
        out = self.model(tokens, position_ids, attention_mask, list(zip(past_keys, past_values)),
                         logit_positions=logit_positions)
        return (out.logits, *(k for k, _ in out.kv_cache), *(v for _, v in out.kv_cache))


def input_names(num_layers: int) -> list[str]:
    return (["tokens", "position_ids", "attention_mask", "logit_positions"]
            + [f"past_key_{i}" for i in range(num_layers)] + [f"past_value_{i}" for i in range(num_layers)])


def output_names(num_layers: int) -> list[str]:
    return (["logits"] + [f"present_key_{i}" for i in range(num_layers)]
            + [f"present_value_{i}" for i in range(num_layers)])


def _sample_inputs(model: GLMModel):
    # Sizes of at least 2 everywhere, so that torch.export does not specialise them.
    batch, seq, past = 2, 3, 4
    heads, hd = model.config.num_attention_heads // model.mapping.tp_size, model.config.head_dim
    tokens = torch.zeros(batch, seq, dtype=torch.long)
    positions = torch.arange(seq).repeat(batch, 1) + past
    pasts = [torch.zeros(batch, heads, past, hd, dtype=model.dtype) for _ in range(model.config.num_layers)]
    mask = torch.zeros(batch, 1, seq, past + seq, dtype=torch.bool)
    return (tokens, positions, mask, torch.arange(1, seq), pasts, [p.clone() for p in pasts])


def _dynamic_shapes(num_layers: int):
    dyn = torch.export.Dim.DYNAMIC
    return {"tokens": {0: dyn, 1: dyn}, "position_ids": {0: dyn, 1: dyn},
            "attention_mask": {0: dyn, 2: dyn, 3: dyn}, "logit_positions": {0: dyn},
            "past_keys": [{0: dyn, 2: dyn}] * num_layers, "past_values": [{0: dyn, 2: dyn}] * num_layers}


def export_graph(model: GLMModel, kind: str = "step") -> ir.Model:
    """The unoptimised ONNX graph (opset 23) of `kind` for the rank `model` holds."""
    if kind not in GRAPHS:
        raise ValueError(kind)
    num_layers = model.config.num_layers
    wrapper = StepGraph(model).eval()
    comm = model.comm
    model.comm = ExportCollectives() if model.mapping.tp_size > 1 else SingleRank()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed": nothing glmc needs
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, _sample_inputs(model), dynamo=True, opset_version=23, optimize=False,
                input_names=input_names(num_layers), output_names=output_names(num_layers),
                dynamic_shapes=_dynamic_shapes(num_layers), verbose=False,
                custom_translation_table={all_reduce._opoverload: onnx_all_reduce},
            )
    finally:
        model.comm = comm
        registry_log.setLevel(level)
    _check_ranges(program, kind)
    onnx_model = program.model
    # Parameters keep the reference model's (= SAT's) names, so every graph of a rank
    # refers to the same weights by the same name.
    for value in list(onnx_model.graph.initializers.values()):
        if value.name.startswith(_PARAMETER_PREFIX):
            onnx_model.graph.initializers.pop(value.name)
            value.name = value.name[len(_PARAMETER_PREFIX):]
            onnx_model.graph.initializers[value.name] = value
    onnx_model.graph.name = f"glm_{kind}"
    _type_shape_ops(onnx_model.graph)
    return onnx_model


_KEEPS_TYPE = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Identity", "Expand", "Slice", "Gather"}


def _type_shape_ops(graph: ir.Graph) -> None:
    """Give the outputs of data-movement ops their input's dtype where the exporter left it unset
    (the logit positions' Reshape), so that passes checking dtypes know every value's."""
    for node in graph:  # topologically sorted: inputs are typed first
        if node.op_type in _KEEPS_TYPE and node.domain == "" and node.inputs and node.inputs[0] is not None:
            source = node.inputs[0]
            for out in node.outputs:
                if out.dtype is None and source.dtype is not None:
                    out.type = ir.TensorType(source.dtype)


def _check_ranges(program, kind: str) -> None:
    """A branch on a dynamic size would be baked in silently: every symbolic size must
    still range from at most 1 (one new token, an empty past) to unbounded."""
    for symbol, bounds in program.exported_program.range_constraints.items():
        if bounds.lower > 1 or bounds.upper < 2**31:
            raise ExportError(f"the {kind} graph specialised size {symbol} to [{bounds.lower}, {bounds.upper}]")
