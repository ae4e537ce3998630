"""Weight-only int8/int4 (GLM-130B's scheme) on every backend: packages hold codes and scales.

The golden numbers come from the reference model run on the dequantized weights, where
the dequantization is computed here in numpy from the checkpoint's codes as GLM-130B's
kernel does it (`half(q) * scale`), independently of glmc.quantization. glm-tiny with
wide random weights; codes made by `glmc convert --quantization-bit-width` (whose int8
output is checked against GLM-130B's own convert_tp.py in test_checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import glmc
from conftest import TINY_SPECIAL as S
from conftest import record_step_logits
from glmc.api import export
from glmc.checkpoint import SatCheckpoint, convert_checkpoint, load_model, model_state, save_checkpoint
from glmc.config import PRESETS
from glmc.errors import CheckpointError, GlmcError
from glmc.generation.strategies import BaseStrategy
from glmc.graphs import ExportError, Package, PackageError
from glmc.graphs.package import MANIFEST
from glmc.graphs.trace import export_graph
from glmc.model import GLMModel
from glmc.model.init import init_wide_random_
from glmc.model.quantized import DOMAIN, OP, weight_only_matmul
from glmc.passes import TARGETS, optimize, weight_only_matmul as pass_module
from glmc.quantization import (
    dequantize_linear_layout,
    from_dequantize_linear_layout,
    from_matmul_nbits_layout,
    block_size_for,
    matmul_nbits_layout,
    quantize,
)
from conftest import run_ort
from tolerances import assert_close, half_precision_limit, quantized_limit

MATRICES = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
PROMPTS = [[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, S.mask, 23, 24], [31, S.gmask], [41, 42, S.smask, 43, 44, 45],
           [51, 52, 53, S.gmask], [61, S.mask, 62, 63]]


# --- the sources: GLM-130B's codes, and the reference on their dequantized weights --------------

@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    """(bits, tp) -> glm-tiny quantized by `glmc convert` (per rank, as GLM-130B's convert_tp.py)."""
    root = tmp_path_factory.mktemp("quantized")
    ckpt = SatCheckpoint.open(tiny_checkpoint)
    return {(bits, tp): convert_checkpoint(ckpt, root / f"int{bits}-tp{tp}", tp, quantization_bits=bits)
            for bits, tp in ((8, 1), (4, 1), (4, 2), (8, 4))}


# (name) -> (source, export options). Quantized at export or taken from a quantized checkpoint.
PACKAGES = {
    "int8": ("float", dict(quantization_bits=8)),
    "int4": ("float", dict(quantization_bits=4)),
    "int8-tensorrt": ((8, 1), dict(target="tensorrt")),
    "int4-tensorrt": ((4, 1), dict(target="tensorrt")),
    "int4-tp2": ((4, 2), dict(tp_size=2)),
    "int8-tp4": ("float", dict(quantization_bits=8, tp_size=4)),
    "int4-tp8": ((4, 1), dict(tp_size=8)),  # a column split of TP-1 codes: exact
}
# The codes each package must hold (the quantized checkpoint made by `glmc convert`).
CODES_OF = {"int8": (8, 1), "int4": (4, 1), "int8-tensorrt": (8, 1), "int4-tensorrt": (4, 1), "int4-tp2": (4, 2),
            "int8-tp4": (8, 4), "int4-tp8": (4, 1)}


@pytest.fixture(scope="module")
def packages(tiny_checkpoint, quantized, tmp_path_factory):
    """Every package of the module, exported up front in two processes (tracing runs on one core)."""
    root = tmp_path_factory.mktemp("quantized-pkg")
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(export, tiny_checkpoint if source == "float" else quantized[source],
                                     root / name, **options) for name, (source, options) in PACKAGES.items()}
        return {name: future.result() for name, future in futures.items()}


def shards(path) -> list[dict[str, torch.Tensor]]:
    ckpt = SatCheckpoint.open(path)
    return [ckpt.load_shard(rank) for rank in range(ckpt.tp_size)]


def dequantized(codes: np.ndarray, scale: np.ndarray, bits: int, exact: bool = False) -> np.ndarray:
    """GLM-130B's kernel: half(q) * scale (fp16, rounded once), q unpacked even-column-high.
    `exact`: the product q * scale unrounded (exact in float32), as MatMulNBits computes it."""
    codes = codes.view(np.int8)
    if bits == 4:
        high = codes >> 4
        low = (codes << 4).astype(np.int8) >> 4
        codes = np.stack([high, low], -1).reshape(codes.shape[0], -1)
    if exact:
        return (codes.astype(np.float64) * scale.astype(np.float64)[:, None]).astype(np.float32)
    return (codes.astype(np.float16) * scale.astype(np.float16)[:, None]).astype(np.float32)


def gather_tp1(states: list[dict[str, np.ndarray]], inner: int) -> dict[str, np.ndarray]:
    """Float weights of every rank -> the TP-1 model's, by GLM-130B's split of each tensor."""
    tp, out = len(states), {}
    for name in states[0]:
        parts = [s[name] for s in states]
        if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            out[name] = np.concatenate(parts, axis=1)  # row-parallel: input columns
        elif name.endswith("dense_h_to_4h.weight") or name.endswith("dense_h_to_4h.bias"):
            half = parts[0].shape[0] // 2  # GeGLU: [x1 block; x2 block] per rank
            out[name] = np.concatenate([p[:half] for p in parts] + [p[half:] for p in parts], axis=0)
        elif name.endswith(("query_key_value.weight", "query_key_value.bias")) or name == "word_embeddings.weight":
            out[name] = np.concatenate(parts, axis=0)
        else:
            out[name] = parts[0]
    assert tp == 1 or out["layers.0.mlp.dense_h_to_4h.weight"].shape[0] == 2 * inner
    return out


def dequantized_reference(path, out, exact: bool = False):
    """The reference model (torch backend, fp32, TP 1) on the dequantized weights of the quantized
    checkpoint `path` (any TP degree), written as a float checkpoint to `out`."""
    ckpt = SatCheckpoint.open(path)
    bits = ckpt.info.quantization_bits
    states = []
    for state in shards(path):
        dense = {}
        for name, tensor in state.items():
            if name.endswith("_scale"):
                continue
            if name + "_scale" in state:
                dense[name] = dequantized(tensor.numpy(), state[name + "_scale"].numpy(), bits, exact)
            else:
                dense[name] = tensor.numpy()
        states.append(dense)
    full = {name: torch.from_numpy(array.copy())
            for name, array in gather_tp1(states, ckpt.config.inner_hidden_size).items()}
    save_checkpoint(out, ckpt.config, [full], iteration="1", metadata={"special_tokens": S.to_dict()})
    return glmc.load(out, backend="torch", dtype="float32")


@pytest.fixture(scope="module")
def reference_of(quantized, tmp_path_factory):
    """(bits, tp) -> the reference on the dequantized weights of those codes; `exact`: on the exact
    products q * scale instead."""
    root = tmp_path_factory.mktemp("dequantized")
    made = {}

    def get(key, exact: bool = False):
        if (key, exact) not in made:
            made[key, exact] = dequantized_reference(
                quantized[key], root / f"int{key[0]}-tp{key[1]}{'-exact' if exact else ''}", exact)
        return made[key, exact]

    return get


def glm_inputs(length=14, context=9, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, 1000, (batch, length)))
    positions = torch.arange(length).repeat(batch, 1)
    positions[0, context:] = context - 1
    mask = ~torch.ones(length, length, dtype=torch.bool).tril()
    mask[:, : context - 1] = False
    return tokens, positions, mask[None, None].repeat(batch, 1, 1, 1)


def matmul_nbits(name: str, backend: str) -> bool:
    """Whether the run multiplies with MatMulNBits (ONNX Runtime on an onnxruntime-target package)."""
    return backend == "onnxruntime" and "tensorrt" not in name


def check(reference_of, name: str, backend: str, actual, inputs, rows, what: str) -> None:
    """Every path but MatMulNBits computes GLM's dequantized weights exactly: fp32's tolerance against
    the reference. MatMulNBits: fp32's against the reference on the exact products q * scale, which
    it computes, and `quantized_limit` against GLM's rounding."""
    def logits(exact):
        with torch.no_grad():
            return reference_of(CODES_OF[name], exact).executable.model(*inputs).logits[rows]

    expected = logits(False)
    if not matmul_nbits(name, backend):
        assert_close(actual, expected, "float32", what)
        return
    exact = logits(True)
    assert_close(actual, exact, "float32", f"{what} (vs the exact products)")
    bits = CODES_OF[name][0]
    assert_close(actual, expected, f"int{bits}", what, limit=quantized_limit(expected, exact, bits))


# --- packages: codes and scales, never a float copy -------------------------------------------

def test_a_package_stores_codes_and_scales_never_a_float_copy(packages, tiny_package):
    """int4: each matrix is MatMulNBits' uint8 codes plus its scales: about 1/8 of its fp32 bytes
    (plus one scale per 128-weight block); the embedding, LayerNorms and biases stay float32."""
    for name, bits, limit in (("int4", 4, 0.17), ("int8", 8, 0.29)):
        package = Package.open(packages[name], verify="full")
        assert package.quantization_bits == bits and package.manifest["quantization"]["codes_from"] == "export"
        tensors = package.manifest["ranks"][0]["tensors"]
        parameters = package.manifest["ranks"][0]["parameters"]
        float_rank = Package.open(tiny_package).manifest["ranks"][0]
        stored = fp32 = 0
        for layer in range(package.config.num_layers):
            for matrix in MATRICES:
                weight = f"layers.{layer}.{matrix}.weight"
                # The QKV rows regrouped [q | k | v] (passes/attention_3d), each with its own scale.
                grouped = ["group_qkv"] if matrix == "attention.query_key_value" else []
                assert parameters[weight]["transforms"] == grouped + ["matmul_nbits"]
                codes = tensors[parameters[weight]["initializer"]]
                scales = tensors[parameters[weight + "_scale"]["initializer"]]
                assert codes["dtype"] == "UINT8" and scales["dtype"] == "FLOAT"
                assert not any(n.startswith(weight) and t["dtype"] == "FLOAT" and len(t["shape"]) == 2
                               for n, t in tensors.items())
                stored += codes["length"] + scales["length"]
                fp32 += float_rank["tensors"][float_rank["parameters"][weight]["initializer"]]["length"]
        assert stored / fp32 < limit, (name, stored / fp32)
        floats = {n for n, t in tensors.items() if t["dtype"] == "FLOAT"}
        assert "word_embeddings.weight.T" in floats and "layers.0.input_layernorm.weight" in floats
        # The weight file is the float one less the matrices' fp32 bytes plus their codes and scales.
        saved = fp32 - stored
        float_size = Package.open(tiny_package).weights_path(0).stat().st_size
        assert package.weights_path(0).stat().st_size <= float_size - saved + 4096 * 4 * len(MATRICES) * 3


def test_no_graph_of_a_quantized_package_holds_a_float_matrix(packages):
    """Inside the graphs too (a folded dequantization would land there as a constant, not in
    the weight file): every float tensor of two or more dimensions is the embedding, a
    rotary table or quantization scales, at every TP degree and target."""
    for name, path in packages.items():
        package = Package.open(path)
        for rank in range(package.tp_size):
            graph = onnx.load(str(package.graph_path(rank, "step")), load_external_data=False).graph
            tensors = [(t.name, t) for t in graph.initializer]
            tensors += [(n.name, a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.t.dims]
            for what, tensor in tensors:
                floating = tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                onnx.TensorProto.BFLOAT16)
                if floating and len(tensor.dims) >= 2:  # scales: int4's block-wise ones are [blocks, N]
                    assert any(part in what for part in ("word_embeddings", "rotary", "weight_scale")), (
                        name, rank, what, list(tensor.dims))


def test_packages_keep_glm130bs_codes_bit_for_bit(packages, quantized, tmp_path):
    """Quantized at export or taken from a quantized checkpoint, at TP 1, 2, 4 and 8: every rank's
    codes and scales read back from the package equal the checkpoint's (`glmc convert`) bit for bit."""
    split8 = convert_checkpoint(SatCheckpoint.open(quantized[4, 1]), tmp_path / "int4-tp8", 8)
    for name in PACKAGES:
        package = Package.open(packages[name])
        expected = shards(split8 if name == "int4-tp8" else quantized[CODES_OF[name]])
        assert package.tp_size == len(expected)
        for rank, shard in enumerate(expected):
            state = package.state_dict(rank)
            for key, tensor in shard.items():
                if tensor.dtype in (torch.int8, torch.float16):
                    assert state[key].dtype == tensor.dtype, (name, rank, key)
                    assert torch.equal(state[key].view(torch.uint8 if tensor.dtype == torch.int8 else torch.int16),
                                       tensor.view(torch.uint8 if tensor.dtype == torch.int8 else torch.int16)), \
                        (name, rank, key)
        assert package.manifest["quantization"]["codes_from"] == ("export" if PACKAGES[name][0] == "float"
                                                                  else "checkpoint")


def test_exported_run_and_converted_back_gives_the_same_codes(packages, quantized, tmp_path):
    """Checkpoint -> package -> the torch backend's model -> checkpoint: the same bytes; and a TP
    round trip through 2 and 8 ranks and back."""
    model = glmc.load(packages["int4-tensorrt"], backend="torch").executable.model
    back = save_checkpoint(tmp_path / "back", model.config, [model_state(model)])
    original, returned = shards(quantized[4, 1])[0], shards(back)[0]
    assert set(original) == set(returned)
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype and np.array_equal(
            returned[key].numpy().view(np.uint8), tensor.numpy().view(np.uint8)), key
    tp2 = convert_checkpoint(SatCheckpoint.open(quantized[4, 1]), tmp_path / "tp2", 2)
    tp8 = convert_checkpoint(SatCheckpoint.open(tp2), tmp_path / "tp8", 8)
    tp1 = convert_checkpoint(SatCheckpoint.open(tp8), tmp_path / "tp1", 1)
    for key, tensor in original.items():
        assert np.array_equal(shards(tp1)[0][key].numpy().view(np.uint8), tensor.numpy().view(np.uint8)), key


# --- numerics: every backend against the dequantized reference -------------------------------

RUNS = [(name, backend) for name in ("int8", "int4", "int8-tensorrt", "int4-tensorrt")
        for backend in ("onnxruntime", "torch")]


@pytest.mark.parametrize("name,backend", RUNS, ids=[f"{n}-{b}" for n, b in RUNS])
def test_logits_agree_with_the_dequantized_reference(packages, reference_of, name, backend):
    model = glmc.load(packages[name], backend=backend)
    inputs = glm_inputs()
    tokens, positions, mask = inputs
    logits, _ = model.logits(tokens, positions, mask)
    check(reference_of, name, backend, logits, inputs, np.s_[:], f"{name} on {backend}: logits")
    logits, cache = model.executable.prefill(tokens[:, :9], positions[:, :9], mask[..., :9, :9])
    steps = [logits[:, -1]]
    for i in range(9, 13):  # cached decode, one token at a time
        logits, cache = model.executable.decode(tokens[:, i:i + 1], positions[:, i:i + 1], mask[..., i:i + 1, :i + 1],
                                                cache)
        steps.append(logits[:, -1])
    check(reference_of, name, backend, torch.stack(steps, 1), inputs, np.s_[:, 8:13],
          f"{name} on {backend}: cached decode")


def test_the_torch_backend_runs_a_quantized_checkpoint_as_the_reference(quantized, reference_of):
    tokens, positions, mask = glm_inputs(seed=3)
    for key in ((8, 1), (4, 1)):
        model = glmc.load(quantized[key], backend="torch")
        assert model.executable.model.quantization_bits == key[0]
        with torch.no_grad():
            expected = reference_of(key).executable.model(tokens, positions, mask).logits
        assert_close(model.logits(tokens, positions, mask)[0], expected, "float32", f"int{key[0]} checkpoint")


def greedy(model, prompt) -> tuple[list[int], float]:
    """Greedy tokens of one prompt, and the smallest top-1 / top-2 margin of its steps over the peak."""
    strategy = BaseStrategy(top_k=1)
    steps = record_step_logits(strategy)
    tokens = model.generate([prompt], strategy, out_seq_length=24)[0].token_ids
    logits = torch.cat([step.float().reshape(-1, step.shape[-1]) for step in steps])
    top2 = logits.topk(2, dim=-1).values
    return tokens, float((top2[:, 0] - top2[:, 1]).min()) / float(logits.abs().max())


@pytest.mark.parametrize("bits", [8, 4])
def test_greedy_tokens_equal_where_the_margin_exceeds_the_tolerance(tmp_path, bits):
    """MatMulNBits' greedy tokens: those of the reference on the exact products wherever its top-2
    margin exceeds fp32's tolerance, and those of the reference on GLM's rounding wherever its margin
    exceeds the quantized limit measured on this model. One layer of wide random weights: through
    three the rounding is amplified to 3e-2 of the peak, beyond every margin of glm-tiny's prompts."""
    config = dataclasses.replace(PRESETS["glm-tiny"], num_layers=1)
    float_path = save_checkpoint(tmp_path / "float", config, [model_state(init_wide_random_(GLMModel(config), 5))],
                                 metadata={"special_tokens": S.to_dict()})
    codes = convert_checkpoint(SatCheckpoint.open(float_path), tmp_path / "codes", 1, quantization_bits=bits)
    model = glmc.load(export(codes, tmp_path / "pkg"), backend="onnxruntime")
    glm = dequantized_reference(codes, tmp_path / "glm")
    exact = dequantized_reference(codes, tmp_path / "exact", exact=True)
    inputs = glm_inputs()
    with torch.no_grad():
        limit = quantized_limit(*(r.executable.model(*inputs).logits for r in (glm, exact)), bits)
    compared = {"exact": 0, "glm": 0}
    for prompt in PROMPTS:
        got, _ = greedy(model, prompt)
        for kind, reference, threshold in (("exact", exact, 3e-5), ("glm", glm, limit)):
            expected, margin = greedy(reference, prompt)
            if margin > threshold:
                assert got == expected, (prompt, kind, margin, threshold)
                compared[kind] += 1
    assert compared["exact"] >= len(PROMPTS) - 1 and compared["glm"] >= 2, (compared, limit)


@pytest.mark.parametrize("name,backend", [("int4-tp2", "onnxruntime"), ("int4-tp2", "torch"),
                                          ("int8-tp4", "onnxruntime"), ("int4-tp8", "onnxruntime")])
def test_tensor_parallel_packages(packages, reference_of, name, backend):
    tp = Package.open(packages[name]).tp_size
    inputs = glm_inputs(seed=7)
    with glmc.load(packages[name], backend=backend, tp_size=tp) as model:
        logits, _ = model.logits(*inputs)
    check(reference_of, name, backend, logits, inputs, np.s_[:], f"{name} on {backend} at TP {tp}")


HALF_RUNS = [("float16", "onnxruntime"), ("float16", "torch"), ("bfloat16", "torch")]  # ORT: no bf16 CPU kernels


@pytest.fixture(scope="module")
def one_layer_codes(tmp_path_factory):
    """bits -> a one-layer glm-tiny with wide random weights, quantized by `glmc convert`. Half
    precision's distance from fp32 grows layer by layer through wide random weights; at one layer
    it stays small enough that a wrong scale shows above it."""
    root = tmp_path_factory.mktemp("one-layer")
    model = init_wide_random_(GLMModel(dataclasses.replace(PRESETS["glm-tiny"], num_layers=1)), seed=21)
    save_checkpoint(root / "float", model.config, [model_state(model)], iteration="1",
                    metadata={"special_tokens": S.to_dict()})
    ckpt = SatCheckpoint.open(root / "float")
    return {bits: convert_checkpoint(ckpt, root / f"int{bits}", 1, quantization_bits=bits) for bits in (8, 4)}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype,backend", HALF_RUNS, ids=[f"{d}-{b}" for d, b in HALF_RUNS])
def test_half_precision_packages_agree_with_the_reference_in_their_dtype(one_layer_codes, tmp_path, bits, dtype,
                                                                         backend):
    """GLM-130B runs its int8/int4 codes with fp16 activations: a float16 (or bfloat16) package of
    the codes against the reference model run in that dtype on the dequantized weights, whole
    sequences and cached decode, within `half_precision_limit` (twice the reference's own distance
    from its fp32 run). ONNX Runtime multiplies with MatMulNBits on fp16 scales, by the products
    q * scale unrounded where GLM rounds them to fp16: its limit adds `quantized_limit`, as in fp32.
    bf16, which MatMulNBits does not take, lowers to DequantizeLinear + MatMul."""
    package = export(one_layer_codes[bits], tmp_path / "pkg", dtype=dtype)
    opened = Package.open(package)
    matrices = len(MATRICES) * opened.config.num_layers
    graph = onnx.load(str(opened.graph_path(0, "step")), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    if dtype == "float16":
        scales = {t.name: t.data_type for t in graph.initializer}
        assert len(nbits) == matrices and {scales[n.input[2]] for n in nbits} == {onnx.TensorProto.FLOAT16}
    else:
        assert not nbits and sum(n.op_type == "DequantizeLinear" for n in graph.node) == matrices
    reference32 = dequantized_reference(one_layer_codes[bits], tmp_path / "dequantized")
    reference = glmc.load(tmp_path / "dequantized", backend="torch", dtype=dtype)
    model = glmc.load(package, backend=backend, dtype=dtype)  # torch on CPU would otherwise compute in fp32
    tokens, positions, mask = inputs = glm_inputs(seed=5)
    with torch.no_grad():
        exact = reference32.executable.model(*inputs).logits
        expected = reference.executable.model(*inputs).logits
    limit = half_precision_limit(expected, exact, dtype)
    if backend == "onnxruntime":
        products = dequantized_reference(one_layer_codes[bits], tmp_path / "products", exact=True)
        with torch.no_grad():
            limit += quantized_limit(exact, products.executable.model(*inputs).logits, bits)
    logits, _ = model.logits(tokens, positions, mask)
    assert_close(logits, expected, dtype, f"int{bits} {dtype} on {backend}: logits", limit=limit)
    logits, cache = model.executable.prefill(tokens[:, :9], positions[:, :9], mask[..., :9, :9])
    steps = [logits[:, -1]]
    for i in range(9, 13):
        logits, cache = model.executable.decode(tokens[:, i:i + 1], positions[:, i:i + 1], mask[..., i:i + 1, :i + 1],
                                                cache)
        steps.append(logits[:, -1])
    assert_close(torch.stack(steps, 1), expected[:, 8:13], dtype, f"int{bits} {dtype} on {backend}: cached decode",
                 limit=limit)


# --- the pass: ops after it, numerics against eager PyTorch, a declined case ------------------

@pytest.fixture(scope="module")
def quantized_model(quantized):
    return load_model(SatCheckpoint.open(quantized[4, 1]))


@pytest.fixture(scope="module")
def traced(quantized_model):
    return ir.to_proto(export_graph(quantized_model, "step"))


def ops(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_pass_lowers_every_quantized_matmul_to_matmul_nbits(traced, quantized_model):
    model = ir.from_proto(traced)
    assert ops(model)[f"{DOMAIN}.{OP}"] == 4 * quantized_model.config.num_layers
    _, counts, declined = optimize(model, "onnxruntime")
    after = ops(model)
    assert counts["weight_only_matmul"] == 4 * quantized_model.config.num_layers and "weight_only_matmul" not in declined
    # The quantized QKV's rows are regrouped like a float weight's columns, so the cache stays in place.
    layers = quantized_model.config.num_layers
    assert counts["attention_3d"] == layers and counts["static_kv_cache"] == layers, (counts, declined)
    assert after["com.microsoft.GroupQueryAttention"] == layers
    assert after["com.microsoft.MatMulNBits"] == 4 * quantized_model.config.num_layers
    assert f"{DOMAIN}.{OP}" not in after and "DequantizeLinear" not in after
    assert after["MatMul"] == 1  # only the tied output projection stays a float matmul
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            attributes = {k: v.value for k, v in node.attributes.items()}
            assert attributes["bits"] == 4 and attributes["accuracy_level"] == 0
            assert node.inputs[1].dtype == ir.DataType.UINT8 and node.inputs[2].dtype == ir.DataType.FLOAT
    names = set(model.graph.initializers)
    assert "layers.0.attention.dense.weight.nbits" in names and "layers.0.attention.dense.weight" not in names


def _decode_feeds(model, seed=0):
    """A decode step of a batch of 2: one new token over a past of 9 (GroupQueryAttention takes
    several new tokens over a past one row at a time, which the backend does)."""
    tokens, positions, mask = glm_inputs(length=10, context=6, seed=seed)
    with torch.no_grad():
        prefix = model(tokens[:, :9], positions[:, :9], mask[..., :9, :9])
        full = model(tokens, positions, mask)
    feeds = {"tokens": tokens[:, 9:].numpy(), "position_ids": positions[:, 9:].numpy(),
             "attention_mask": mask[..., 9:, :].numpy(), "logit_positions": np.arange(1)}
    for i, (k, v) in enumerate(prefix.kv_cache):
        feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = k.numpy(), v.numpy()
    return feeds, full.logits[:, 9:]


def _run(model: ir.Model, feeds) -> np.ndarray:
    return run_ort(model, feeds)["logits"]  # static KV buffers bound where the graph writes them in place


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_pass_numerics_against_eager_pytorch(traced, quantized_model, target):
    """The eager quantized model computes GLM's kernel (half(q) * scale) exactly, and so does
    DequantizeLinear: fp32's tolerance. MatMulNBits (q * scale unrounded): the int4 limit."""
    model = ir.from_proto(traced)
    optimize(model, target)
    feeds, expected = _decode_feeds(quantized_model)
    limit = 3e-2 if target == "onnxruntime" else None  # the largest quantized_limit measured on glm-tiny
    assert_close(_run(model, feeds), expected, "int4" if target == "onnxruntime" else "float32",
                 f"{target} graph vs eager", limit=limit)


def _synthetic(dtype: ir.DataType, bits: int = 8, constant_codes: bool = True) -> ir.Model:
    """One glmc.WeightOnlyMatMul on x [2, 32] of `dtype`, codes of a 6 x 32 weight."""
    q, scale = quantize(torch.randn(6, 32), bits)
    x = ir.Value(name="x", type=ir.TensorType(dtype), shape=ir.Shape([2, 32]))
    codes = ir.Value(name="w", type=ir.TensorType(ir.DataType.INT8), shape=ir.Shape(list(q.shape)),
                     const_value=ir.tensor(q.numpy()) if constant_codes else None)
    scales = ir.Value(name="w_scale", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape([6]),
                      const_value=ir.tensor(scale.numpy()))
    node = ir.node(OP, [x, codes, scales], attributes={"bits": bits}, domain=DOMAIN, name="wom")
    node.outputs[0].type, node.outputs[0].shape = ir.TensorType(dtype), ir.Shape([2, 6])
    inputs = [x] if constant_codes else [x, codes]
    graph = ir.Graph(inputs, node.outputs, nodes=[node], initializers=[scales] + ([codes] if constant_codes else []),
                     opset_imports={"": 23, DOMAIN: 1}, name="g")
    return ir.Model(graph, ir_version=10)


def test_pass_declines_bfloat16_activations_with_the_reason():
    """MatMulNBits has no bfloat16 type: the pass says so and lowers to DequantizeLinear + MatMul."""
    model = _synthetic(ir.DataType.BFLOAT16)
    outcome = pass_module.run(model, TARGETS["onnxruntime"])
    assert outcome.count == 0
    assert outcome.declined == ["wom: BFLOAT16 activations, MatMulNBits takes FLOAT and FLOAT16: "
                                "DequantizeLinear + MatMul"]
    assert ops(model) == {"DequantizeLinear": 1, "Cast": 1, "MatMul": 1}
    assert DOMAIN not in model.opset_imports and "com.microsoft" not in model.opset_imports


def test_pass_refuses_what_it_cannot_store():
    with pytest.raises(ExportError, match="wom: w is not a stored weight"):
        pass_module.run(_synthetic(ir.DataType.FLOAT, constant_codes=False), TARGETS["onnxruntime"])
    model = _synthetic(ir.DataType.FLOAT)
    next(iter(model.graph)).attributes["bits"] = ir.AttrInt64("bits", 3)
    with pytest.raises(ExportError, match="wom: quantization bit width must be 4 or 8, got 3"):
        pass_module.run(model, TARGETS["onnxruntime"])


# --- the storage layouts, checked by the ops that read them ------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k", [64, 200])  # 200: a partial last block
def test_layouts_read_by_onnx_runtime_give_glms_weights(bits, k):
    """MatMulNBits and DequantizeLinear, run by ONNX Runtime on the stored layouts, compute with
    GLM's codes and scales; each layout converts back to GLM's bytes."""
    torch.manual_seed(k)
    q, scale = quantize(torch.randn(48, k), bits)
    codes, s16 = q.numpy(), scale.numpy()
    weight = dequantized(codes, s16, bits)
    x = np.random.default_rng(bits).standard_normal((3, k)).astype(np.float32)
    b = matmul_nbits_layout(codes, bits)
    assert np.array_equal(from_matmul_nbits_layout(b, bits, k), codes)
    stored = dequantize_linear_layout(codes, bits)
    assert np.array_equal(from_dequantize_linear_layout(stored, bits), codes)
    from onnx import TensorProto, helper, numpy_helper
    block = block_size_for(k)
    nbits = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=48, bits=bits,
                             block_size=block, accuracy_level=0)
    scales = np.repeat(s16.astype(np.float32), b.shape[1])
    graph = helper.make_graph([nbits], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    q_times_scale = _signed(codes, bits).astype(np.float64) * s16.astype(np.float64)[:, None]
    assert np.abs(y - x @ q_times_scale.T).max() <= 1e-5 * np.abs(y).max()
    # DequantizeLinear: fp16 half(q) * scale, exactly GLM's weight.
    elem = TensorProto.INT8 if bits == 8 else TensorProto.INT4
    codes_t = helper.make_tensor("Q", elem, [k, 48], stored.tobytes(), raw=True)
    s = s16 if bits == 8 else np.broadcast_to(s16, (-(-k // block), 48)).copy()
    attributes = {"axis": 1} if bits == 8 else {"axis": 0, "block_size": block}
    dq = helper.make_node("DequantizeLinear", ["Q", "S"], ["w"], **attributes)
    graph = helper.make_graph([dq], "g", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT16, None)],
                              [codes_t, numpy_helper.from_array(s, "S")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    w = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(w.astype(np.float32), weight.T)


def _signed(codes: np.ndarray, bits: int) -> np.ndarray:
    codes = codes.view(np.int8)
    if bits == 8:
        return codes
    return np.stack([codes >> 4, (codes << 4).astype(np.int8) >> 4], -1).reshape(codes.shape[0], -1)


# --- the torch backend's kernels ----------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_torch_quantized_matmul(bits):
    """float32: GLM's dequantized weight block by block, the reference's numbers; bfloat16 on CPU:
    PyTorch's weight-only kernels, within bfloat16's tolerance of the bfloat16 reference."""
    torch.manual_seed(bits)
    q, scale = quantize(torch.randn(96, 256), bits)
    weight = torch.from_numpy(dequantized(q.numpy(), scale.numpy(), bits))
    x = torch.randn(2, 5, 256)
    assert_close(weight_only_matmul(x, q, scale, bits), x @ weight.T, "float32", "blocked")
    cache = {}
    got = weight_only_matmul(x.bfloat16(), q, scale, bits, cache)
    assert got.dtype == torch.bfloat16
    assert_close(got, x.bfloat16() @ weight.bfloat16().T, "bfloat16", "packed kernel")
    assert (bits == 4) == ("int4" in cache)  # the int4 kernel's layout is made once and kept


def test_torch_quantized_matmul_never_holds_the_float_weight():
    """A 64 MiB int8 weight (256 MiB in fp32), multiplied in a fresh process: the peak resident
    memory grows by far less than the fp32 weight would take."""
    script = textwrap.dedent("""
        import resource, torch
        from glmc.model.quantized import weight_only_matmul
        torch.set_num_threads(1)
        q = torch.randint(-127, 128, (16384, 4096), dtype=torch.int8)
        scale = torch.rand(16384).half()
        x = torch.randn(4, 4096)
        weight_only_matmul(x[:1, :], q[:16], scale[:16], 8)  # warm up the allocator and kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        y = weight_only_matmul(x, q, scale, 8)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.split()[-1])
    assert grown < 32 << 20, f"peak memory grew by {grown / 2**20:.0f} MiB"


# --- bad input: one line naming the file and key -------------------------------------------------

def _edit_shard(path, change):
    file = path / "1000" / "mp_rank_00_model_states.pt"
    payload = torch.load(file, weights_only=True)
    change(payload["module"])
    torch.save(payload, file)
    return file


@pytest.mark.parametrize("case,message", [
    ("missing scale", "missing transformer.layers.1.attention.dense.weight_scale"),
    ("scale shape", "transformer.layers.1.attention.dense.weight_scale has shape [32], expected [64]"),
    ("scale dtype", "transformer.layers.1.attention.dense.weight_scale has dtype float32, expected float16"),
    ("bit width", "transformer.layers.0.attention.query_key_value.weight: int8 codes 16 bytes wide for 64 input "
                  "columns, a quantization bit width of 2; GLM-130B's are 8 or 4"),
])
def test_a_bad_quantized_checkpoint_is_one_line(quantized, tmp_path, case, message):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(quantized[8, 1], path)
    key = "transformer.layers.1.attention.dense.weight_scale"
    changes = {
        "missing scale": lambda m: m.pop(key),
        "scale shape": lambda m: m.__setitem__(key, m[key][:32].clone()),
        "scale dtype": lambda m: m.__setitem__(key, m[key].float()),
        "bit width": lambda m: m.__setitem__("transformer.layers.0.attention.query_key_value.weight",
                                             m["transformer.layers.0.attention.query_key_value.weight"][:, :16]
                                             .clone()),
    }
    file = _edit_shard(path, changes[case])
    with pytest.raises(CheckpointError) as error:
        SatCheckpoint.open(path)
    assert str(error.value).startswith(f"{file}: ") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_int4_with_an_odd_column_count_is_one_line(tmp_path):
    """GeGLU width 254 at TP 2: 127 input columns per rank cannot pack two per byte."""
    config = dataclasses.replace(PRESETS["glm-tiny"], num_layers=1, inner_hidden_size=254)
    model = init_wide_random_(GLMModel(config), seed=2)
    path = save_checkpoint(tmp_path / "odd", config, [model_state(model)])
    with pytest.raises(CheckpointError, match=r"int4 packs two columns per byte; at TP 2 the input width of "
                                              r"mlp.dense_4h_to_h \(127\) is odd"):
        convert_checkpoint(SatCheckpoint.open(path), tmp_path / "out", 2, quantization_bits=4)
    with pytest.raises(CheckpointError, match="int4 packs two columns per byte"):
        export(path, tmp_path / "pkg", tp_size=2, quantization_bits=4)
    assert not (tmp_path / "out").exists() and not (tmp_path / "pkg").exists()


def test_a_checkpoint_of_int4_codes_with_an_odd_column_count_is_one_line(tmp_path):
    """A shard whose codes say int4 (QKV packed two per byte) for a GeGLU width of 127: its
    output matrix cannot hold whole bytes of codes."""
    config = dataclasses.replace(PRESETS["glm-tiny"], num_layers=1, inner_hidden_size=127)
    state = model_state(init_wide_random_(GLMModel(config), seed=3))
    for matrix in MATRICES:
        weight = state.pop(f"layers.0.{matrix}.weight")
        state[f"layers.0.{matrix}.weight"] = torch.zeros(weight.shape[0], weight.shape[1] // 2, dtype=torch.int8)
        state[f"layers.0.{matrix}.weight_scale"] = torch.ones(weight.shape[0], dtype=torch.float16)
    path = save_checkpoint(tmp_path / "odd", config, [state])
    with pytest.raises(CheckpointError) as error:
        SatCheckpoint.open(path)
    assert str(error.value) == (
        f"{path / '1' / 'mp_rank_00_model_states.pt'}: transformer.layers.0.mlp.dense_4h_to_h.weight: int4 codes "
        "pack two columns per byte, but the matrix has an odd column count (127) at TP 1")


def test_a_bit_width_other_than_4_or_8_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(GlmcError, match="--quantization-bit-width: quantization bit width must be 4 or 8, got 3"):
        export(tiny_checkpoint, tmp_path / "pkg", quantization_bits=3)
    result = subprocess.run([sys.executable, "-m", "glmc", "export", str(tiny_checkpoint), "-o", str(tmp_path / "p"),
                             "--quantization-bit-width", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "'3' is not one of '4', '8'" in result.stderr
    assert not (tmp_path / "pkg").exists() and not (tmp_path / "p").exists()


def _tampered(packages, tmp_path, change) -> tuple:
    import shutil

    path = tmp_path / "pkg"
    shutil.copytree(packages["int4-tensorrt"], path)
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path, path / MANIFEST


def test_a_bad_quantized_package_is_one_line(packages, tmp_path):
    cases = {
        "quantization.bits: expected 4 or 8, got an integer (3)":
            lambda m: m["quantization"].__setitem__("bits", 3),
        ".shape: INT4 codes are stored two per byte along the last axis: [64, 63]":
            lambda m: m["ranks"][0]["tensors"]["layers.0.attention.dense.weight.dq"].__setitem__("shape", [64, 63]),
        "weight_scale.dq' is [1, 32] of FLOAT16, dequantize_linear stores this parameter as [1, 64] of FLOAT16":
            lambda m: m["ranks"][0]["tensors"]["layers.0.attention.dense.weight_scale.dq"].update(
                shape=[1, 32], length=64),
        "].transforms: expected one of [[\"matmul_nbits\"], [\"dequantize_linear\"], [\"group_qkv\", ":
            lambda m: m["ranks"][0]["parameters"]["layers.0.attention.dense.weight"].__setitem__(
                "transforms", ["transpose"]),
    }
    for message, change in cases.items():
        path, manifest = _tampered(packages, tmp_path / str(len(message)), change)
        with pytest.raises(PackageError) as error:
            Package.open(path)
        assert str(error.value).startswith(f"{manifest}: ") and message in str(error.value), str(error.value)


# --- inspect and the command line -----------------------------------------------------------------

def test_inspect_shows_bits_per_weight(packages, quantized):
    result = subprocess.run([sys.executable, "-m", "glmc", "inspect", str(packages["int4"]), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    bits = json.loads(result.stdout)["bits_per_weight"]
    # int4 codes and one fp32 scale per block of a row (64 or 128 input columns: 4 + 32/128 .. 4 + 32/64).
    assert 4.25 <= bits["quantized_matrices"] <= 4.5 and bits["float"] == 32 and bits["float_dtype"] == "float32"
    result = subprocess.run([sys.executable, "-m", "glmc", "inspect", str(quantized[8, 1])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "in the quantized matrices" in result.stdout and "32 in the" in result.stdout


def test_export_cli_quantizes(tiny_checkpoint, tmp_path):
    result = subprocess.run([sys.executable, "-m", "glmc", "export", str(tiny_checkpoint), "-o", str(tmp_path / "p"),
                             "--quantization-bit-width", "8", "--target", "unfused", "--no-progress", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["quantization_bits"] == 8
    assert summary["declined"]["step"]["weight_only_matmul"] == [
        "target unfused has no com.microsoft ops: 12 quantized matmuls as DequantizeLinear + MatMul"]
    graph = onnx.load(str(tmp_path / "p" / "rank0" / "step.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == 12


def test_tensorrt_gets_packed_int4_weights_from_the_package(packages):
    """The TensorRT backend hands the parser each weight from the package's file: INT4 packed, two
    codes a byte (its byte count), the bytes the DequantizeLinear layout holds. (Building engines
    needs TensorRT and a GPU; this is the part that runs here.)"""
    from glmc.backends.tensorrt import external_weights

    package = Package.open(packages["int4-tensorrt"])
    model = onnx.load(str(package.graph_path(0, "step")), load_external_data=False)
    weights = dict(external_weights(model, package, 0))
    codes = weights["layers.0.attention.dense.weight.dq"]
    assert codes.nbytes == 64 * 64 // 2
    expected = dequantize_linear_layout(package.state_dict(0)["layers.0.attention.dense.weight"].numpy(), 4)
    assert np.array_equal(codes.reshape(-1), expected.reshape(-1))
