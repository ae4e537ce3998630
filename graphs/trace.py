"""Trace one tensor-parallel rank of the reference model into ONNX graphs.

Two graphs per rank, both with dynamic batch and sequence axes:

* prefill: tokens, position_ids, attention_mask [b, 1, s, s] ->
  logits of the last position [b, 1, vocab / tp], present_key_i / present_value_i [b, heads / tp, s, hd]
* decode: the same plus past_key_i / past_value_i [b, heads / tp, past, hd], mask
  [b, 1, s, past + s] -> logits of every new position [b, s, vocab / tp], present K/V [.., past + s, ..]

The decode graph takes any number of new tokens and an empty past, so it also
serves full-logit calls. Logits stay vocab-parallel: rank r holds vocabulary
rows [r * V / tp, (r + 1) * V / tp); the runtime gathers them. Masks follow SAT:
boolean, True = masked out.
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

GRAPHS = ("prefill", "decode")
_PARAMETER_PREFIX = "model."


class ExportError(GlmcError):
    """The traced graph would not serve every shape the runtime uses."""


class PrefillGraph(nn.Module):
    def __init__(self, model: GLMModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, position_ids, attention_mask):
        out = self.model(tokens, position_ids, attention_mask, last_logits_only=True)
        return (out.logits, *(k for k, _ in out.kv_cache), *(v for _, v in out.kv_cache))


class DecodeGraph(nn.Module):
    def __init__(self, model: GLMModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, position_ids, attention_mask, past_keys, past_values):
        out = self.model(tokens, position_ids, attention_mask, list(zip(past_keys, past_values)))
        return (out.logits, *(k for k, _ in out.kv_cache), *(v for _, v in out.kv_cache))


def input_names(kind: str, num_layers: int) -> list[str]:
    names = ["tokens", "position_ids", "attention_mask"]
    if kind == "decode":
        names += [f"past_key_{i}" for i in range(num_layers)] + [f"past_value_{i}" for i in range(num_layers)]
    return names


def output_names(num_layers: int) -> list[str]:
    return (["logits"] + [f"present_key_{i}" for i in range(num_layers)]
            + [f"present_value_{i}" for i in range(num_layers)])


def _sample_inputs(model: GLMModel, kind: str):
    # Sizes of at least 2 everywhere, so that torch.export does not specialise them.
    batch, seq, past = 2, 3, 4
    heads, hd = model.config.num_attention_heads // model.mapping.tp_size, model.config.head_dim
    tokens = torch.zeros(batch, seq, dtype=torch.long)
    positions = torch.arange(seq).repeat(batch, 1)
    if kind == "prefill":
        return (tokens, positions, torch.zeros(batch, 1, seq, seq, dtype=torch.bool))
    pasts = [torch.zeros(batch, heads, past, hd, dtype=model.dtype) for _ in range(model.config.num_layers)]
    mask = torch.zeros(batch, 1, seq, past + seq, dtype=torch.bool)
    return (tokens, positions + past, mask, pasts, [p.clone() for p in pasts])


def _dynamic_shapes(kind: str, num_layers: int):
    dyn = torch.export.Dim.DYNAMIC
    shapes = {"tokens": {0: dyn, 1: dyn}, "position_ids": {0: dyn, 1: dyn},
              "attention_mask": {0: dyn, 2: dyn, 3: dyn}}
    if kind == "decode":
        shapes["past_keys"] = [{0: dyn, 2: dyn}] * num_layers
        shapes["past_values"] = [{0: dyn, 2: dyn}] * num_layers
    return shapes


def export_graph(model: GLMModel, kind: str) -> ir.Model:
    """The unoptimised ONNX graph (opset 23) of `kind` for the rank `model` holds."""
    if kind not in GRAPHS:
        raise ValueError(kind)
    num_layers = model.config.num_layers
    wrapper = (PrefillGraph if kind == "prefill" else DecodeGraph)(model).eval()
    comm = model.comm
    model.comm = ExportCollectives() if model.mapping.tp_size > 1 else SingleRank()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed": nothing glmc needs
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, _sample_inputs(model, kind), dynamo=True, opset_version=23, optimize=False,
                input_names=input_names(kind, num_layers), output_names=output_names(num_layers),
                dynamic_shapes=_dynamic_shapes(kind, num_layers), verbose=False,
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
    return onnx_model


def _check_ranges(program, kind: str) -> None:
    """A branch on a dynamic size would be baked in silently: every symbolic size must
    still range from at most 1 (one new token, an empty past) to unbounded."""
    for symbol, bounds in program.exported_program.range_constraints.items():
        if bounds.lower > 1 or bounds.upper < 2**31:
            raise ExportError(f"the {kind} graph specialised size {symbol} to [{bounds.lower}, {bounds.upper}]")
