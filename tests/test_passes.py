"""Each pass: the ops after it, numerics against eager PyTorch, and a case it must decline."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from glmc.graphs.trace import export_graph
from glmc.passes import (
    TARGETS,
    attention_3d,
    cleanup,
    fp32_softmax,
    fuse_attention,
    fuse_geglu,
    fuse_rotary,
    optimize,
    prepack_weights,
    static_kv_cache,
)
from conftest import run_ort
from tolerances import assert_close

ONNX_RUNTIME = TARGETS["onnxruntime"]


@pytest.fixture(scope="module")
def exported(tiny_model):
    """The unoptimised step graph of glm-tiny, as a proto to copy from."""
    return ir.to_proto(export_graph(tiny_model))


def fresh(exported, prepared: bool = True) -> ir.Model:
    model = ir.from_proto(exported)
    if prepared:  # what every fusion expects to run after
        prepack_weights.run(model, ONNX_RUNTIME)
        cleanup.run(model, ONNX_RUNTIME)
    return model


def ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def decode_inputs(tiny_model, batch=2, past=5, new=3, seed=0):
    rng = np.random.default_rng(seed)
    total = past + new
    tokens = rng.integers(0, 1000, (batch, total))
    positions = np.tile(np.arange(total), (batch, 1))
    mask = ~np.tril(np.ones((total, total), dtype=bool))[None, None].repeat(batch, 0)
    mask[..., : past - 1] = False  # a GLM context: bidirectional before the last context token
    with torch.no_grad():
        prefix = tiny_model(torch.tensor(tokens[:, :past]), torch.tensor(positions[:, :past]),
                            torch.tensor(mask[..., :past, :past]))
        full = tiny_model(torch.tensor(tokens), torch.tensor(positions), torch.tensor(mask))
    feeds = {"tokens": tokens[:, past:], "position_ids": positions[:, past:], "attention_mask": mask[..., past:, :],
             "logit_positions": np.arange(new)}
    for i, (k, v) in enumerate(prefix.kv_cache):
        feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = k.numpy(), v.numpy()
    expected = {"logits": full.logits[:, past:].numpy()}
    for i, (k, v) in enumerate(full.kv_cache):
        expected[f"present_key_{i}"], expected[f"present_value_{i}"] = k.numpy(), v.numpy()
    return feeds, expected


def prefill_inputs(tiny_model, batch=2, length=7, seed=1):
    """A prefill: an empty past, the last position's logits."""
    rng = np.random.default_rng(seed)
    tokens, positions = rng.integers(0, 1000, (batch, length)), np.tile(np.arange(length), (batch, 1))
    mask = ~np.tril(np.ones((length, length), dtype=bool))[None, None].repeat(batch, 0)
    mask[..., : length - 3] = False
    heads, hd = tiny_model.config.num_attention_heads, tiny_model.config.head_dim
    feeds = {"tokens": tokens, "position_ids": positions, "attention_mask": mask,
             "logit_positions": np.array([length - 1])}
    for i in range(tiny_model.config.num_layers):
        feeds[f"past_key_{i}"] = feeds[f"past_value_{i}"] = np.zeros((batch, heads, 0, hd), np.float32)
    with torch.no_grad():
        out = tiny_model(*map(torch.tensor, (tokens, positions, mask)), last_logits_only=True)
    expected = {"logits": out.logits.numpy()}
    for i, (k, v) in enumerate(out.kv_cache):
        expected[f"present_key_{i}"], expected[f"present_value_{i}"] = k.numpy(), v.numpy()
    return feeds, expected


def assert_matches_eager(model, tiny_model, what, inputs=decode_inputs):
    feeds, expected = inputs(tiny_model)
    got = run_ort(model, feeds)
    for name in ("logits", "present_key_2", "present_value_2"):
        assert_close(got[name], expected[name], "float32", f"{what}: {name}")


# --- prepack_weights ------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_prepack_stores_each_weight_once_transposed(exported, tiny_model, target):
    model = fresh(exported, prepared=False)
    outcome = prepack_weights.run(model, TARGETS[target])
    layers = tiny_model.config.num_layers
    assert outcome.count == 4 * layers + 1  # four matmuls per layer and the tied embedding
    names = set(model.graph.initializers)
    assert not any(n.op_type == "Transpose" and n.inputs[0].name in names for n in model.graph)
    if target == "onnxruntime":  # the embedding twice: rows for the lookups, W.T for the projection
        assert {"word_embeddings.weight", "word_embeddings.weight.T"} <= names
        lookup = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[0].name in names)
        assert lookup.inputs[0].name == "word_embeddings.weight"
    else:
        assert "word_embeddings.weight.T" in names and "word_embeddings.weight" not in names
    assert_matches_eager(model, tiny_model, "prepack_weights")


def test_prepack_declines_a_weight_read_otherwise(exported):
    model = fresh(exported, prepared=False)
    weight = model.graph.initializers["layers.0.attention.dense.weight"]
    extra = ir.node("Relu", [weight], name="extra_reader")
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    outcome = prepack_weights.run(model, ONNX_RUNTIME)
    assert "layers.0.attention.dense.weight: also read by Relu (input 0)" in outcome.declined
    assert "layers.0.attention.dense.weight" in model.graph.initializers


# --- cleanup --------------------------------------------------------------------------------

def test_cleanup_folds_the_exporters_sequences(exported, tiny_model):
    model = fresh(exported, prepared=False)
    prepack_weights.run(model, ONNX_RUNTIME)
    before = ops(model)
    outcome = cleanup.run(model, ONNX_RUNTIME)
    after = ops(model)
    assert outcome.count > 0 and before.get("SplitToSequence") and "SplitToSequence" not in after
    assert "Constant" not in after
    assert_matches_eager(model, tiny_model, "cleanup")


# --- fuse_rotary ----------------------------------------------------------------------------

def test_rotary_fusion(exported, tiny_model):
    model = fresh(exported)
    outcome = fuse_rotary.run(model, ONNX_RUNTIME)
    cleanup.run(model, ONNX_RUNTIME)
    layers = tiny_model.config.num_layers
    assert outcome.count == 2 * layers and ops(model)["RotaryEmbedding"] == 2 * layers
    assert "Neg" not in ops(model)
    half = model.graph.initializers["rotary_cos.half"].const_value.numpy()
    assert np.array_equal(half, tiny_model.rotary_cos[:, : tiny_model.config.head_dim // 2].numpy())
    assert_matches_eager(model, tiny_model, "fuse_rotary")


def test_rotary_fusion_declines_a_table_that_is_not_rotate_half(exported):
    model = fresh(exported)
    table = model.graph.initializers["rotary_cos"]
    values = table.const_value.numpy().copy()
    values[:, 0] += 1.0
    table.const_value = ir.tensor(values, name="rotary_cos")
    outcome = fuse_rotary.run(model, ONNX_RUNTIME)
    assert outcome.count == 0
    assert "rotary_cos: its halves differ, so it is not a rotate-half table" in outcome.declined


def test_rotary_fusion_is_not_produced_for_tensorrt(exported):
    model = fresh(exported)
    outcome = fuse_rotary.run(model, TARGETS["tensorrt"])
    assert outcome.count == 0 and "RotaryEmbedding" not in ops(model)


# --- fuse_attention -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_attention_fusion(exported, tiny_model, kind):
    model = fresh(exported)
    fuse_rotary.run(model, ONNX_RUNTIME)
    outcome = fuse_attention.run(model, ONNX_RUNTIME)
    cleanup.run(model, ONNX_RUNTIME)
    layers = tiny_model.config.num_layers
    assert outcome.count == layers and ops(model)["Attention"] == layers
    assert "Softmax" not in ops(model) and "Where" not in ops(model)
    attention = [n for n in model.graph if n.op_type == "Attention"]
    assert [n.attributes["scale"].as_float() for n in attention] == [float(i + 1) for i in range(layers)]
    assert all(n.attributes["softmax_precision"].as_int() == 1 for n in attention)
    assert all(len(n.inputs) == 6 and len(n.outputs) == 3 for n in attention)  # past in, present out
    assert_matches_eager(model, tiny_model, "fuse_attention",
                         inputs=decode_inputs if kind == "decode" else prefill_inputs)


def test_attention_fusion_declines_a_small_fill(exported):
    model = fresh(exported)
    for node in model.graph:
        if node.op_type == "Where":
            small = ir.Value(name=f"{node.name}_fill", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                             const_value=ir.tensor(np.array(-5.0, dtype=np.float32)))
            model.graph.register_initializer(small)
            node.replace_input_with(1, small)
    outcome = fuse_attention.run(model, ONNX_RUNTIME)
    assert outcome.count == 0
    assert any("filled with -5.0, not a large negative" in reason for reason in outcome.declined)


# --- attention_3d ---------------------------------------------------------------------------

def fused(exported) -> ir.Model:
    model = fresh(exported)
    fuse_rotary.run(model, ONNX_RUNTIME)
    fuse_attention.run(model, ONNX_RUNTIME)
    return model


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_attention_3d_drops_the_transposes(exported, tiny_model, kind):
    model = fused(exported)
    outcome = attention_3d.run(model, ONNX_RUNTIME)
    cleanup.run(model, ONNX_RUNTIME)
    layers, heads = tiny_model.config.num_layers, tiny_model.config.num_attention_heads
    assert outcome.count == layers
    attention = [n for n in model.graph if n.op_type == "Attention"]
    assert all(n.attributes["q_num_heads"].as_int() == heads == n.attributes["kv_num_heads"].as_int()
               for n in attention)
    split = attention[0].inputs[0].producer().inputs[0].producer().inputs[0].producer()  # Div <- Rotary <- Split
    assert split.op_type == "Split" and len(split.outputs) == 3  # q, k, v as [b, s, hidden]
    assert "Transpose" not in ops(model)  # Attention returns the cache [b, heads, seq, hd] itself
    weight = model.graph.initializers["layers.1.attention.query_key_value.weight.T.qkv"].const_value.numpy()
    original = tiny_model.layers[1].attention.query_key_value.weight.detach().numpy().T
    assert np.array_equal(attention_3d.ungroup_columns(weight, heads), original)
    assert_matches_eager(model, tiny_model, "attention_3d",
                         inputs=decode_inputs if kind == "decode" else prefill_inputs)


def test_attention_3d_declines_a_bias_that_is_not_constant(exported):
    model = fused(exported)
    bias = model.graph.initializers.pop("layers.0.attention.query_key_value.bias")
    bias.const_value = None
    model.graph.inputs.append(bias)
    outcome = attention_3d.run(model, ONNX_RUNTIME)
    assert outcome.count == 2 and "the QKV weight or bias is not a constant" in outcome.declined


def test_grouping_columns_round_trips():
    array = np.arange(2 * 4 * 3 * 5).reshape(2, 4 * 3 * 5)
    grouped = attention_3d.group_columns(array, heads=4)
    assert np.array_equal(grouped[:, :5], array[:, :5]) and np.array_equal(grouped[:, 5:10], array[:, 15:20])
    assert np.array_equal(attention_3d.ungroup_columns(grouped, heads=4), array)


# --- static_kv_cache ------------------------------------------------------------------------

def to_3d(exported) -> ir.Model:
    model = fused(exported)
    attention_3d.run(model, ONNX_RUNTIME)
    return model


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_static_kv_cache_writes_the_cache_in_place(exported, tiny_model, kind):
    model = to_3d(exported)
    outcome = static_kv_cache.run(model, ONNX_RUNTIME)
    cleanup.run(model, ONNX_RUNTIME)
    layers = tiny_model.config.num_layers
    assert outcome.count == layers and outcome.declined == []
    assert ops(model)["GroupQueryAttention"] == layers and "Attention" not in ops(model)
    nodes = [n for n in model.graph if static_kv_cache.is_static_attention(n)]
    assert [n.attributes["scale"].as_float() for n in nodes] == [float(i + 1) for i in range(layers)]
    assert all(n.attributes["causal"].as_int() == 0 for n in nodes)
    assert all(n.inputs[3].is_graph_input() and n.outputs[1].is_graph_output() for n in nodes)
    # run_ort binds buffers as both past and present: the presents compared are what the op wrote there.
    # ONNX Runtime takes several new tokens over a past for batch 1 only (the backend goes row by row).
    cases = [functools.partial(decode_inputs, batch=2, new=1), functools.partial(decode_inputs, batch=1)] \
        if kind == "decode" else [prefill_inputs]
    for inputs in cases:
        assert_matches_eager(model, tiny_model, "static_kv_cache", inputs=inputs)


def test_static_kv_cache_declines_a_softmax_not_in_fp32(exported):
    model = to_3d(exported)
    for node in model.graph:
        if node.op_type == "Attention":
            node.attributes["softmax_precision"] = ir.AttrInt64("softmax_precision", ir.DataType.FLOAT16.value)
    outcome = static_kv_cache.run(model, ONNX_RUNTIME)
    assert outcome.count == 0 and "Attention" in ops(model)
    assert all(reason.endswith("the softmax is not computed in FP32") for reason in outcome.declined)
    assert len(outcome.declined) == 3


def test_static_kv_cache_is_not_produced_for_tensorrt(exported):
    model = to_3d(exported)
    outcome = static_kv_cache.run(model, TARGETS["tensorrt"])
    assert outcome.count == 0 and outcome.declined == ["target tensorrt keeps a concatenated KV cache"]


# --- fuse_geglu -----------------------------------------------------------------------------

def test_geglu_fusion(exported, tiny_model):
    model = fresh(exported)
    outcome = fuse_geglu.run(model, ONNX_RUNTIME)
    cleanup.run(model, ONNX_RUNTIME)
    layers = tiny_model.config.num_layers
    assert outcome.count == layers and ops(model)["GeGLU"] == layers and "Gelu" not in ops(model)
    assert ("glmc", "GeGLU", "") in model.functions
    assert_matches_eager(model, tiny_model, "fuse_geglu")


def test_geglu_fusion_declines_the_tanh_gelu(exported):
    model = fresh(exported)
    for node in model.graph:
        if node.op_type == "Gelu":
            node.attributes["approximate"] = ir.AttrString("approximate", "tanh")
    outcome = fuse_geglu.run(model, ONNX_RUNTIME)
    assert outcome.count == 0
    assert any("tanh-approximated GELU" in reason for reason in outcome.declined)


# --- fp32_softmax ---------------------------------------------------------------------------

def half_softmax_model() -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape([2, 5]), type=ir.TensorType(ir.DataType.FLOAT16))
    softmax = ir.node("Softmax", [x], attributes={"axis": -1}, name="softmax")
    softmax.outputs[0].name = "y"
    softmax.outputs[0].type = ir.TensorType(ir.DataType.FLOAT16)
    graph = ir.Graph([x], softmax.outputs, nodes=[softmax], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def test_fp32_softmax_upcasts_a_half_softmax():
    model = half_softmax_model()
    assert fp32_softmax.softmax_dtypes(model) == ["FLOAT16"]
    outcome = fp32_softmax.run(model, ONNX_RUNTIME)
    assert outcome.count == 1 and fp32_softmax.softmax_dtypes(model) == ["FLOAT"]
    assert [n.op_type for n in model.graph] == ["Cast", "Softmax", "Cast"]
    x = np.array([[8.0, 7.5, -3.0, 0.0, 1.0], [0.1, 0.2, 0.3, 0.4, 0.5]], dtype=np.float16)
    (got,) = ReferenceEvaluator(ir.to_proto(model)).run(None, {"x": x})
    expected = torch.softmax(torch.from_numpy(x).float(), -1).half().numpy()
    assert got.dtype == np.float16 and np.array_equal(got, expected)


def test_fp32_softmax_reports_an_unknown_dtype():
    model = half_softmax_model()
    model.graph.inputs[0].type = None
    outcome = fp32_softmax.run(model, ONNX_RUNTIME)
    assert outcome.count == 0 and outcome.declined == ["softmax: input dtype unknown"]


# --- the pipeline ---------------------------------------------------------------------------

def test_optimize_counts_and_checker(exported, tiny_model):
    model = fresh(exported, prepared=False)
    model, counts, declined = optimize(model, "onnxruntime")
    layers = tiny_model.config.num_layers
    assert counts["fuse_attention"] == layers and counts["fuse_rotary"] == 2 * layers
    assert counts["fuse_geglu"] == layers and counts["fp32_softmax"] == 0
    assert counts["static_kv_cache"] == layers
    assert declined == {}
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert_matches_eager(model, tiny_model, "optimize", inputs=functools.partial(decode_inputs, batch=2, new=1))


def test_tensorrt_target_keeps_primitives_and_no_microsoft_ops(exported):
    model = fresh(exported, prepared=False)
    model, counts, declined = optimize(model, "tensorrt")
    assert counts["fuse_attention"] == counts["fuse_rotary"] == counts["fuse_geglu"] == 0
    assert {"Attention", "RotaryEmbedding", "GeGLU"}.isdisjoint(ops(model))
    assert all(n.domain in ("", "glmc") for n in model.graph.all_nodes())
    assert {"fuse_rotary", "fuse_attention", "attention_3d", "fuse_geglu", "static_kv_cache"} <= set(declined)
