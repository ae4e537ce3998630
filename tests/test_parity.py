"""The parity matrix: every export target x dtype x depth, run on ONNX Runtime against the
reference model on the same inputs (prefill, cached decode, a padded batch).

Each package is exported from a SAT checkpoint with wide random weights (the facts
page's init scales, so that attention and GeGLU change the output) and compared with
the reference model run in the package's dtype. A pass that changes the numbers of any
target fails here: the fused target runs every fusion, the other two the passes they
share (prepack, cleanup, fp32_softmax). bfloat16 exports, but ONNX Runtime has no
bfloat16 CPU kernels: its graphs are checked for structure here and its numerics on
the torch backend (tests/test_half_precision.py).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import onnx
import pytest
import torch

import glmc
from conftest import SAT_TINY, TINY_SPECIAL
from glmc.checkpoint import model_state, save_checkpoint
from glmc.config import PRESETS
from glmc.graphs import Package
from glmc.model import GLMModel
from glmc.model.init import init_wide_random_
from glmc.passes import TARGETS
from tolerances import assert_close, half_precision_limit

DEPTHS = (1, 2, 3)
RUN_DTYPES = ("float32", "float16")  # what ONNX Runtime runs on CPU
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def config_of(layers: int):
    return dataclasses.replace(PRESETS["glm-tiny"], num_layers=layers)


@pytest.fixture(scope="session")
def wide_checkpoints(tmp_path_factory):
    """One fp32 SAT checkpoint per depth, with wide random weights. Two layers: the SAT golden
    model itself (made by SAT 0.2.12 with these scales), where the broken targets were found."""
    root = tmp_path_factory.mktemp("parity")
    paths = {2: SAT_TINY / "checkpoint"}
    for layers in set(DEPTHS) - set(paths):
        model = init_wide_random_(GLMModel(config_of(layers)), seed=10 + layers)
        paths[layers] = root / f"layers{layers}"
        save_checkpoint(paths[layers], model.config, [model_state(model)], iteration="1",
                        metadata={"special_tokens": TINY_SPECIAL.to_dict()})
    return paths


@pytest.fixture(scope="session")
def package_of(wide_checkpoints, tmp_path_factory):
    """(target, dtype, layers) -> the exported package. Every package of the module is exported
    up front in two processes: tracing runs on one core, and exports are most of this file's time."""
    from glmc.api import export

    keys = [*MATRIX, *((target, "bfloat16", 2) for target in TARGETS)]
    root = tmp_path_factory.mktemp("parity-pkg")
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(export, wide_checkpoints[key[2]], root / "-".join(map(str, key)),
                                    target=key[0], dtype=key[1]) for key in keys}
        packages = {key: future.result() for key, future in futures.items()}
    return packages.__getitem__


@pytest.fixture(scope="session")
def reference_of(wide_checkpoints):
    """(dtype, layers) -> the reference model in that dtype, from the same checkpoint."""
    cache = {}

    def get(dtype: str, layers: int) -> GLMModel:
        if (dtype, layers) not in cache:
            cache[dtype, layers] = glmc.load(wide_checkpoints[layers], backend="torch", dtype=dtype).executable.model
        return cache[dtype, layers]
    return get


def glm_prompt(length: int, context: int, batch: int, seed: int):
    """A GLM sample: bidirectional context, then causal rows; [MASK]-style positions on row 0.
    `context` 0: a causal prompt with plain positions."""
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, 1000, (batch, length)))
    positions = torch.arange(length).repeat(batch, 1)
    mask = ~torch.ones(length, length, dtype=torch.bool).tril()
    if context:
        positions[0, context:] = context - 1
        mask[:, : context - 1] = False
    return tokens, positions, mask[None, None].repeat(batch, 1, 1, 1)


def reference_logits(model: GLMModel, tokens, positions, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, positions, mask).logits.float()


class Expected:
    """The reference's logits in the package's dtype, and the limit to compare with: the
    table's for fp32, `half_precision_limit` (from the fp32 reference) for fp16."""

    def __init__(self, reference_of, dtype: str, layers: int, tokens, positions, mask):
        self.dtype = dtype
        self.logits = reference_logits(reference_of(dtype, layers), tokens, positions, mask)
        self.limit = None
        if dtype != "float32":
            exact = reference_logits(reference_of("float32", layers), tokens, positions, mask)
            self.limit = half_precision_limit(self.logits, exact, dtype)

    def check(self, actual, rows: slice, what: str) -> None:
        assert_close(actual, self.logits[rows], self.dtype, what, limit=self.limit)


MATRIX = [(target, dtype, layers) for target in TARGETS for dtype in RUN_DTYPES for layers in DEPTHS]
ids = [f"{t}-{d}-{n}layer" for t, d, n in MATRIX]


@pytest.mark.parametrize("target,dtype,layers", MATRIX, ids=ids)
@pytest.mark.parametrize("context", [12, 0], ids=["glm", "causal"])
def test_prefill(package_of, reference_of, target, dtype, layers, context):
    model = glmc.load(package_of((target, dtype, layers)), backend="onnxruntime")
    tokens, positions, mask = glm_prompt(20, context, 2, seed=layers)
    expected = Expected(reference_of, dtype, layers, tokens, positions, mask)
    # Every position's logits, and the last one's (a generation's prefill).
    logits, _ = model.logits(tokens, positions, mask)
    expected.check(logits, np.s_[:], f"{target} {dtype} {layers}-layer logits")
    last, _ = model.executable.prefill(tokens, positions, mask)
    expected.check(last.float(), np.s_[:, -1:], f"{target} {dtype} {layers}-layer prefill")


@pytest.mark.parametrize("target,dtype,layers", MATRIX, ids=ids)
def test_cached_decode(package_of, reference_of, target, dtype, layers):
    model = glmc.load(package_of((target, dtype, layers)), backend="onnxruntime")
    tokens, positions, mask = glm_prompt(20, 12, 2, seed=layers + 5)
    expected = Expected(reference_of, dtype, layers, tokens, positions, mask)
    logits, cache = model.executable.prefill(tokens[:, :12], positions[:, :12], mask[..., :12, :12])
    steps = [logits.float()[:, -1]]
    for i in range(12, 19):
        logits, cache = model.executable.decode(tokens[:, i:i + 1], positions[:, i:i + 1],
                                                mask[..., i:i + 1, :i + 1], cache)
        steps.append(logits.float()[:, -1])
    expected.check(torch.stack(steps, 1), np.s_[:, 11:19], f"{target} {dtype} {layers}-layer decode")


@pytest.mark.parametrize("target,dtype,layers", MATRIX, ids=ids)
def test_padded_batch(package_of, reference_of, target, dtype, layers):
    """A shorter prompt left-padded and masked gives the logits it gives alone."""
    model = glmc.load(package_of((target, dtype, layers)), backend="onnxruntime")
    tokens, positions, mask = glm_prompt(16, 10, 2, seed=layers + 9)
    short, pad = 11, 5
    tokens[1, pad:], tokens[1, :pad] = tokens[1, :short].clone(), 0
    row_positions = positions[1, :short].clone()
    positions[1, :pad], positions[1, pad:] = 0, row_positions
    row_mask = mask[1, 0, :short, :short].clone()
    mask[1] = True
    mask[1, 0, pad:, pad:] = row_mask
    mask[1, 0, :pad, pad:pad + 8] = False  # padding rows see something, so their softmax is defined
    logits, _ = model.logits(tokens, positions, mask)
    alone = Expected(reference_of, dtype, layers, tokens[1:, pad:], positions[1:, pad:], mask[1:, :, pad:, pad:])
    alone.check(logits[1:, pad:], np.s_[:], f"{target} {dtype} {layers}-layer padded row")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_half_precision_exports_with_an_fp32_softmax_and_sats_table(package_of, target, dtype):
    """Half precision exports for every target: weights and graph in that dtype, every
    softmax in FP32, and the rotary table holding SAT's fp16 values (rounded to bf16)."""
    package = Package.open(package_of((target, dtype, 2)))
    assert package.dtype == dtype
    graph = onnx.load(str(package.graph_path(0, "step")), load_external_data=False).graph
    softmax_inputs = {n.input[0] for n in graph.node if n.op_type == "Softmax"}
    attention = [n for n in graph.node if n.op_type == "Attention"]
    # GroupQueryAttention (the onnxruntime target's static cache) computes its softmax in FP32.
    static = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert softmax_inputs or attention or static, "no softmax at all"
    for node in attention:
        precision = next(a.i for a in node.attribute if a.name == "softmax_precision")
        assert precision == onnx.TensorProto.FLOAT
    producers = {out: n for n in graph.node for out in n.output}
    for name in softmax_inputs:  # Softmax(Mul(Cast(scores, FLOAT), c)) or Softmax(Cast(...))
        node = producers[name]
        while node.op_type != "Cast":
            node = producers[node.input[0]]
        assert next(a.i for a in node.attribute if a.name == "to") == onnx.TensorProto.FLOAT
    tensors = package.manifest["ranks"][0]["tensors"]
    assert {entry["dtype"] for entry in tensors.values()} == {dtype.upper()}
    name = "rotary_cos.half" if "rotary_cos.half" in tensors else "rotary_cos"
    table = torch.from_numpy(np.array(package.tensor(0, name)).view(np.int16)).view(TORCH_DTYPES[dtype])
    expected = sat_cos_of_fp16_angles(package.config)[:, : table.shape[1]]
    assert torch.equal(table, expected.to(TORCH_DTYPES[dtype]))


def sat_cos_of_fp16_angles(config) -> torch.Tensor:
    """SAT 0.2.12's cos table before its last rounding, computed here in numpy: inv_freq,
    positions and their products rounded to fp16, cos of those angles (then rounded once to
    the table's dtype: fp16, or bf16 for bf16 models)."""
    hd = config.head_dim
    inv_freq = (1.0 / (config.rotary_base ** (np.arange(0, hd, 2, dtype=np.float32) / hd))).astype(np.float16)
    positions = np.arange(config.max_sequence_length, dtype=np.float16)
    angles = (positions[:, None] * inv_freq[None, :]).astype(np.float16)
    return torch.from_numpy(np.cos(np.concatenate([angles, angles], axis=1).astype(np.float32)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_backend_runs_half_precision_packages_as_the_reference(package_of, reference_of, dtype):
    """The torch backend on a half-precision package computes exactly what the reference model
    computes from the checkpoint in that dtype (bf16 has no ONNX Runtime CPU kernels: this is
    its numeric check; fp16's is the matrix above)."""
    model = glmc.load(package_of(("onnxruntime", dtype, 2)), backend="torch", dtype=dtype)
    assert model.executable.dtype == TORCH_DTYPES[dtype]
    tokens, positions, mask = glm_prompt(14, 8, 2, seed=4)
    reference = reference_of(dtype, 2)
    with torch.no_grad():
        expected = reference(tokens, positions, mask)
    logits, cache = model.executable.prefill(tokens[:, :10], positions[:, :10], mask[..., :10, :10], last_only=False)
    assert logits.dtype == TORCH_DTYPES[dtype] and torch.equal(logits, reference(
        tokens[:, :10], positions[:, :10], mask[..., :10, :10]).logits)
    logits, cache = model.executable.decode(tokens[:, 10:], positions[:, 10:], mask[..., 10:, :], cache)
    assert torch.equal(logits, expected.logits[:, 10:])


def test_only_model_tensors_live_in_the_weights_file(package_of):
    """The root cause of the unfused and TensorRT targets' wrong logits: a rank's graphs once
    shared every float initializer of the weights file by name, though the exporter numbers
    each graph's constants (val_N) on its own, so one graph read the other's. A rank now has
    one graph, and still only the model's tensors (in their storage forms) are external:
    every constant stays in the graph that made it."""
    for target in TARGETS:
        package = Package.open(package_of((target, "float32", 2)))
        tensors = package.manifest["ranks"][0]["tensors"]
        assert all(name.split(".")[0] in ("word_embeddings", "layers", "final_layernorm", "rotary_cos",
                                          "rotary_sin") for name in tensors), sorted(tensors)
        graph = onnx.load(str(package.graph_path(0, "step")), load_external_data=False).graph
        external = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert external == set(tensors)
