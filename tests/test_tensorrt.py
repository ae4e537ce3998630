"""The TensorRT backend: what can be checked without TensorRT here, and what needs it (skipped with
the missing piece named).

On the CPU: the optimisation profiles, the engine cache and its keys, the AllReduce wiring
plan and the segments fallback (run on ONNX Runtime, the two ranks summed in between), the
weight hand-over from the package, the operator check of `glmc export --target tensorrt`
on real exported graphs, and the one-line refusals of `glmc run --backend tensorrt`.
That the `tensorrt`-target graphs compute the reference's logits (on ONNX Runtime) is
tests/test_parity.py's matrix (targets x dtypes x depths); it is not repeated here.

With the tensorrt package and a CUDA device: logits and generation against the reference,
the engine cache reused, the profile's limit refused. No GPU with TensorRT has run these yet.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnx.shape_inference
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from conftest import TINY_SPECIAL
from glmc.backends import BACKENDS
from glmc.run_spec import RunSpec
from glmc.backends import tensorrt as trt_backend
from glmc.backends.tensorrt import (
    EngineCache,
    Limits,
    ShapeRange,
    all_reduce_plan,
    check_capability,
    engine_key,
    external_weights,
    input_profiles,
    key_digest,
    lower_all_reduces,
    profile_shapes,
    tensorrt_segments,
)
from glmc.checkpoint import model_state, save_checkpoint
from glmc.config import PRESETS, Mapping
from glmc.errors import GlmcError
from glmc.graphs import Package
from glmc.graphs.ops import ALL_REDUCE, DOMAIN
from glmc.graphs.segments import split
from glmc.model import GLMModel
from glmc.passes import TARGETS, optimize, tensorrt_ops
from glmc.passes.tensorrt_ops import UnsupportedByTensorRT, operator_table
from tolerances import assert_close, half_precision_limit

REPO = Path(__file__).resolve().parent.parent
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
needs_tensorrt_gpu = pytest.mark.skipif(
    not (HAS_TENSORRT and HAS_CUDA),
    reason="needs " + " and ".join(([] if HAS_TENSORRT else ["the tensorrt package (NVIDIA TensorRT)"])
                                   + ([] if HAS_CUDA else ["a CUDA device"])) + ", missing here")

DTYPES = ("float32", "float16", "bfloat16")
TINY_KEYS = [(dtype, tp) for dtype in DTYPES for tp in (1, 2)]
# glm-bench's ops at two of its twelve layers: every layer is the same graph, and a full
# export of its 1.2 GB of weights would take minutes of the unit suite.
BENCH_KEY = ("glm-bench-2-layers", "float16", 1)


@pytest.fixture(scope="module")
def bench_checkpoint(tmp_path_factory):
    config = dataclasses.replace(PRESETS["glm-bench"], num_layers=2)
    model = GLMModel(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    path = tmp_path_factory.mktemp("bench") / "glm-bench-2"
    save_checkpoint(path, config, [model_state(model)], iteration="1")
    return path


@pytest.fixture(scope="module")
def packages(tiny_checkpoint, bench_checkpoint, tmp_path_factory):
    """key -> a `--target tensorrt` package: glm-tiny in every dtype at TP 1 and 2, and glm-bench
    (two layers) in fp16. Exported up front in two processes: exports are most of this file's time."""
    from glmc.api import export

    root = tmp_path_factory.mktemp("trt-pkg")
    jobs = {(dtype, tp): (tiny_checkpoint, dict(tp_size=tp, dtype=dtype)) for dtype, tp in TINY_KEYS}
    jobs[BENCH_KEY] = (bench_checkpoint, dict(dtype="float16"))
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(export, source, root / "-".join(map(str, key)), target="tensorrt", **options)
                   for key, (source, options) in jobs.items()}
        return {key: Package.open(future.result()) for key, future in futures.items()}


def graph(package: Package, kind: str, rank: int = 0) -> onnx.ModelProto:
    return onnx.load(str(package.graph_path(rank, kind)), load_external_data=False)


# --- the registry and the refusals ----------------------------------------------------------------


def test_registered_for_cuda_in_every_dtype():
    info = BACKENDS["tensorrt"]
    assert info.module == "glmc.backends.tensorrt" and info.devices == ("cuda",)
    assert info.dtypes == ("float32", "float16", "bfloat16") and info.package_target == "tensorrt"


def glmc(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmc", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmc: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_cpu_device_is_refused_before_anything_is_exported(tmp_path):
    result = glmc("run", "--backend", "tensorrt", "--cache-dir", str(tmp_path / "cache"), "Hello [MASK]")
    assert_one_line_error(result, "backend 'tensorrt' does not run on device 'cpu'", "--device cuda")
    assert not (tmp_path / "cache").exists()  # the embedded model was not exported first


@pytest.mark.skipif(HAS_TENSORRT, reason="the tensorrt package is installed here")
def test_missing_tensorrt_package_is_one_line(tmp_path):
    result = glmc("run", "--backend", "tensorrt", "--device", "cuda", "--cache-dir", str(tmp_path / "cache"),
                  "Hello [MASK]")
    assert_one_line_error(result, "needs NVIDIA TensorRT", "tensorrt Python package is not installed",
                          "pip install tensorrt-cu12")
    assert not (tmp_path / "cache").exists()


def stand_in_tensorrt(root: Path, version: str) -> dict:
    """An importable `tensorrt` that only has a version: it stands in for the installed package in
    the checks that come after the package is found (the device's and the version's), so those
    checks of glmc's can run where TensorRT cannot be installed."""
    (root / "tensorrt").mkdir(parents=True)
    (root / "tensorrt" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device")
def test_missing_cuda_is_one_line(tmp_path):
    env = stand_in_tensorrt(tmp_path / "site", "11.1.0")
    result = glmc("run", "--backend", "tensorrt", "--device", "cuda", "--cache-dir", str(tmp_path / "cache"),
                  "Hello [MASK]", env=env)
    assert_one_line_error(result, "--device cuda: no CUDA device is available")
    assert not (tmp_path / "cache").exists()


def test_too_old_tensorrt_is_one_line(tmp_path):
    env = stand_in_tensorrt(tmp_path / "site", "8.6.1")
    result = glmc("run", "--backend", "tensorrt", "--device", "cuda", "Hello [MASK]", env=env)
    assert_one_line_error(result, "TensorRT 8.6.1 is too old", "TensorRT 10 or newer")


def test_bfloat16_needs_compute_capability_8():
    with pytest.raises(GlmcError, match=r"Tesla T4 has compute capability 7\.5.*bfloat16.*8\.0.*--dtype float16"):
        check_capability("bfloat16", (7, 5), "Tesla T4")
    check_capability("bfloat16", (8, 0), "A100")
    check_capability("float16", (7, 5), "Tesla T4")
    check_capability("float32", (7, 0), "V100")


def test_only_tensorrt_packages_are_compiled(tiny_package, tiny_checkpoint):
    from glmc.checkpoint import SatCheckpoint

    options = RunSpec(backend="tensorrt", device="cuda")
    with pytest.raises(GlmcError, match="exported for target onnxruntime.*--target tensorrt"):
        trt_backend.compile(Package.open(tiny_package), Mapping(), options)
    with pytest.raises(GlmcError, match="runs compiled packages"):
        trt_backend.compile(SatCheckpoint.open(tiny_checkpoint), Mapping(), options)


# --- optimisation profiles -------------------------------------------------------------------------


def test_profiles_of_a_glm130b_rank():
    """GLM-130B at TP 8: 12 heads of 128 per rank, 2,048 positions, 4 rows (one prompt, four beams)."""
    config, limits = PRESETS["glm-130b"], Limits.of(PRESETS["glm-130b"], max_batch_size=4)
    step = profile_shapes("step", config, 8, limits)
    assert len(step) == 4 + 2 * 70
    assert step["tokens"] == step["position_ids"] == ShapeRange((1, 1), (1, 1), (4, 2048))
    # past + new <= 2048: one new token over 2,047, or every position new over none (a prefill).
    assert step["attention_mask"] == ShapeRange((1, 1, 1, 1), (1, 1, 1, 1025), (4, 1, 2048, 2048))
    assert step["logit_positions"] == ShapeRange((1,), (1,), (2048,))
    for i in (0, 69):
        for name in (f"past_key_{i}", f"past_value_{i}"):
            assert step[name] == ShapeRange((1, 12, 0, 128), (1, 12, 1024, 128), (4, 12, 2047, 128))
    with pytest.raises(ValueError, match="unknown graph kind"):
        profile_shapes("decode", config, 8, limits)


def test_profiles_follow_the_config_and_the_options(tiny_config):
    default = Limits.of(tiny_config)
    assert (default.max_batch, default.positions) == (8, 128)
    tp2 = profile_shapes("step", tiny_config, 2, Limits.of(tiny_config, max_batch_size=16))
    assert tp2["past_key_2"] == ShapeRange((1, 4, 0, 8), (1, 4, 64, 8), (16, 4, 127, 8))
    short = dataclasses.replace(tiny_config, max_sequence_length=40)
    assert profile_shapes("step", short, 1, Limits.of(short))["tokens"] == ShapeRange((1, 1), (1, 1), (8, 40))
    for bad in (0, -3):
        with pytest.raises(GlmcError, match="max_batch_size must be at least 1"):
            Limits.of(tiny_config, max_batch_size=bad)
    assert ShapeRange((1, 0), (1, 4), (8, 9)).contains((8, 0))
    assert not ShapeRange((1, 0), (1, 4), (8, 9)).contains((9, 1))
    assert not ShapeRange((1, 0), (1, 4), (8, 9)).contains((1, 1, 1))


@pytest.mark.parametrize("tp", [1, 2])
def test_profiles_cover_every_input_of_the_exported_graphs(packages, tiny_config, tp):
    package = packages["float16", tp]
    proto = graph(package, "step", rank=tp - 1)
    shapes = profile_shapes("step", tiny_config, tp, Limits.of(tiny_config))
    assert set(shapes) == {v.name for v in proto.graph.input}
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == len(shapes[value.name].min), value.name
        for i, dim in enumerate(dims):
            if dim.HasField("dim_value"):  # heads per rank, head_dim, the mask's 1
                assert shapes[value.name].min[i] == shapes[value.name].max[i] == dim.dim_value, value.name
    assert input_profiles(proto, proto, shapes) == shapes


def test_segment_inputs_take_the_ranges_of_the_graph_symbols(packages, tiny_config):
    proto = graph(packages["float32", 2], "step")
    shapes = profile_shapes("step", tiny_config, 2, Limits.of(tiny_config))
    segments = tensorrt_segments(proto)
    carried = input_profiles(segments[1].model, proto, shapes)
    # The embedding's sum, [batch, new tokens, hidden]: batch 1..8, new 1..128, hidden 64.
    assert carried["all_reduce"] == ShapeRange((1, 1, 64), (1, 1, 64), (8, 128, 64))
    assert carried["past_key_0"] == shapes["past_key_0"]


# --- the engine cache ------------------------------------------------------------------------------


def base_key(**changes) -> dict:
    fields = dict(graph_sha256="a" * 64, weights_sha256="b" * 64, tensorrt_version="11.1.0", gpu_name="NVIDIA H100",
                  compute_capability=(9, 0), dtype="float16",
                  profile={"tokens": ShapeRange((1, 1), (1, 128), (8, 2048))},
                  collectives=trt_backend.SINGLE, tp_size=1, rank=0)
    fields.update(changes)
    return engine_key(**fields)


def test_every_component_of_the_key_gives_another_engine():
    changes = dict(graph_sha256="c" * 64, weights_sha256="d" * 64, tensorrt_version="11.2.0",
                   gpu_name="NVIDIA H200", compute_capability=(10, 0), dtype="bfloat16",
                   profile={"tokens": ShapeRange((1, 1), (1, 128), (16, 2048))},
                   collectives=trt_backend.SEGMENTS, tp_size=2, rank=1)
    digests = {key_digest(base_key())}
    for field, value in changes.items():
        digests.add(key_digest(base_key(**{field: value})))
    assert len(digests) == 1 + len(changes)
    assert key_digest(base_key()) == key_digest(base_key())  # and it is stable
    key = base_key()
    assert json.loads(json.dumps(key)) == key  # stored as JSON, compared as loaded


def test_cache_round_trip_writes_atomically(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    key = base_key()
    assert cache.load(key) is None
    engine = bytes(range(256)) * 40
    path = cache.store(key, engine)
    assert cache.load(key) == engine
    record = json.loads(cache.paths(key)[1].read_text())
    assert record["key"] == key and record["engine"] == {"bytes": len(engine),
                                                        "sha256": hashlib.sha256(engine).hexdigest()}
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == sorted([path.name, cache.paths(key)[1].name])


def test_cache_never_loads_a_stale_foreign_or_damaged_engine(tmp_path):
    cache = EngineCache(tmp_path)
    key, engine = base_key(), b"engine built for key" * 100
    engine_path, record_path = cache.paths(key)

    def reset():
        cache.store(key, engine)
        assert cache.load(key) == engine

    reset()  # a record saying another key (an engine of another TensorRT, copied or renamed here)
    record = json.loads(record_path.read_text())
    record["key"] = base_key(tensorrt_version="10.13.0")
    record_path.write_text(json.dumps(record))
    assert cache.load(key) is None
    reset()  # an engine of the right size whose bytes changed
    engine_path.write_bytes(b"X" + engine[1:])
    assert cache.load(key) is None
    reset()  # a truncated engine
    engine_path.write_bytes(engine[:-1])
    assert cache.load(key) is None
    reset()  # an engine without its record (interrupted before the record was written)
    record_path.unlink()
    assert cache.load(key) is None
    reset()  # a record that is not JSON
    record_path.write_text("{not json")
    assert cache.load(key) is None


def test_timing_cache_is_kept_per_tensorrt_and_gpu(tmp_path):
    cache = EngineCache(tmp_path)
    h100 = cache.timing_cache_path("11.1.0", "NVIDIA H100", (9, 0))
    assert h100 != cache.timing_cache_path("11.1.0", "NVIDIA H200", (9, 0))
    assert h100 != cache.timing_cache_path("11.2.0", "NVIDIA H100", (9, 0))
    assert cache.load_timing(h100) == b""
    cache.store_timing(h100, b"timings")
    assert cache.load_timing(h100) == b"timings"
    assert h100.parent == tmp_path


DIGESTS = """
import hashlib, sys
import onnx
from glmc.backends.tensorrt import lower_all_reduces, tensorrt_segments
proto = onnx.load(sys.argv[1], load_external_data=False)
models = [lower_all_reduces(proto)] + [s.model for s in tensorrt_segments(proto)]
print(" ".join(hashlib.sha256(m.SerializeToString()).hexdigest() for m in models))
"""


def test_the_graphs_parsed_hash_alike_in_every_process(packages):
    """The key's graph digest is of the bytes handed to the parser (lowered, or cut): they must come
    out the same in another process, or no cached engine would ever be found again."""
    path = str(packages["float32", 2].graph_path(1, "step"))
    runs = [subprocess.run([sys.executable, "-c", DIGESTS, path], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONHASHSEED=seed), check=True).stdout for seed in ("1", "2")]
    assert runs[0] == runs[1] and len(runs[0].split()) == 1 + 8


# --- AllReduce: the wiring plan, the lowering, the segments fallback -------------------------------


def producers(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in proto.graph.node for out in node.output}


def test_all_reduce_wiring_plan_of_a_tp2_graph(packages, tiny_config):
    proto = graph(packages["float32", 2], "step")
    plan = all_reduce_plan(proto)
    # One after the embedding lookup, one after each row-parallel matmul (attention dense, dense_4h_to_h).
    assert len(plan) == 1 + 2 * tiny_config.num_layers
    markers = [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type == ALL_REDUCE]
    assert [(w.node, w.input, w.output) for w in plan] == [(n.name, n.input[0], n.output[0]) for n in markers]
    # The same pairs the ONNX Runtime backend all-reduces between its segments.
    assert [(w.input, w.output) for w in plan] == [pair for s in split(proto) for pair in s.all_reduces]
    made_by = producers(proto)
    assert made_by[plan[0].input].op_type == "Where"  # the embedding rows this rank does not hold, zeroed
    assert all(made_by[w.input].op_type == "MatMul" for w in plan[1:])
    # Each sum has one reader: the first layer's input LayerNorm (GLM-130B's DeepNorm takes its
    # residual after the norm), then the row-parallel layers' biases, added once after the sum.
    readers = {n.name: n for n in proto.graph.node}
    assert [[readers[name].op_type for name, _ in w.consumers] for w in plan] == \
        [["LayerNormalization"]] + [["Add"]] * (len(plan) - 1)
    for wiring in plan:
        assert not wiring.graph_output
        for name, index in wiring.consumers:
            assert readers[name].input[index] == wiring.output


def test_lowering_leaves_identities_where_the_markers_were(packages):
    proto = graph(packages["float16", 2], "step")
    lowered = lower_all_reduces(proto)
    assert not any(n.domain == DOMAIN for n in lowered.graph.node)
    assert DOMAIN not in {o.domain for o in lowered.opset_import}
    identities = {n.name: n for n in lowered.graph.node if n.op_type == "Identity"}
    for wiring in all_reduce_plan(proto):
        assert list(identities[wiring.node].input) == [wiring.input]
        assert list(identities[wiring.node].output) == [wiring.output]
    onnx.shape_inference.infer_shapes(lowered, check_type=True, strict_mode=True)  # a valid graph, every type known
    assert any(n.domain == DOMAIN for n in proto.graph.node)  # the package's graph is untouched
    assert all_reduce_plan(graph(packages["float16", 1], "step")) == []


def run_segments_on_ort(package: Package, kind: str, feeds: dict[str, np.ndarray]) -> dict[int, dict]:
    """Both ranks' fallback segments on ONNX Runtime, the all-reduces summed in between."""
    plans = {}
    for rank in (0, 1):
        sessions = []
        for segment in tensorrt_segments(graph(package, kind, rank)):
            weights = external_weights(segment.model, package, rank)
            options = ort.SessionOptions()
            options.add_external_initializers([name for name, _ in weights],
                                              [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
                                               for _, array in weights])
            sessions.append((ort.InferenceSession(segment.model.SerializeToString(), options,
                                                  providers=["CPUExecutionProvider"]), segment))
        plans[rank] = sessions
    values = {rank: dict(feeds[rank]) for rank in (0, 1)}
    for step in range(len(plans[0])):
        for rank in (0, 1):
            session, segment = plans[rank][step]
            values[rank].update(zip(segment.outputs, session.run(segment.outputs,
                                                                 {n: values[rank][n] for n in segment.inputs})))
        for source, target in plans[0][step][1].all_reduces:
            values[0][target] = values[1][target] = values[0][source] + values[1][source]
    return values


def test_fallback_segments_exchange_activations_only(packages):
    proto = graph(packages["float32", 2], "step")
    graph_inputs = {v.name for v in proto.graph.input}
    segments = tensorrt_segments(proto)
    assert len(segments) == 1 + len(all_reduce_plan(proto))
    for segment in segments:
        for value in segment.model.graph.input:
            passed = value.name not in graph_inputs
            assert not (passed and value.type.tensor_type.elem_type == onnx.TensorProto.INT64), \
                f"the shape value {value.name} crosses between engines"
        assert not any(n.domain == DOMAIN for n in segment.model.graph.node)


def test_fallback_segments_give_the_reference_logits(packages, tiny_model):
    """The TP-2 graphs cut for TensorRT without a collective layer, run on ONNX Runtime with the
    two ranks' partial sums added between segments: the TP-1 reference model's logits."""
    package = packages["float32", 2]
    rng = np.random.default_rng(3)
    batch, context = 2, 9
    tokens = rng.integers(0, 1000, (batch, context + 1))
    positions = np.tile(np.arange(context + 1), (batch, 1))
    mask = ~np.tril(np.ones((context + 1, context + 1), dtype=bool))[None, None].repeat(batch, 0)
    mask[..., : context - 2] = False  # a GLM context: bidirectional before its last tokens
    heads, hd = tiny_model.config.num_attention_heads // 2, tiny_model.config.head_dim
    empty = np.zeros((batch, heads, 0, hd), np.float32)
    first = {"tokens": tokens[:, :context], "position_ids": positions[:, :context],
             "attention_mask": mask[..., :context, :context], "logit_positions": np.array([context - 1]),
             **{f"past_{kv}_{i}": empty for kv in ("key", "value") for i in range(tiny_model.config.num_layers)}}
    prefill = run_segments_on_ort(package, "step", {0: first, 1: first})
    with torch.no_grad():
        expected = tiny_model(torch.tensor(tokens[:, :context]), torch.tensor(positions[:, :context]),
                              torch.tensor(mask[..., :context, :context]), last_logits_only=True)
        step = tiny_model(torch.tensor(tokens[:, context:]), torch.tensor(positions[:, context:]),
                          torch.tensor(mask[..., context:, :]), expected.kv_cache)
    logits = np.concatenate([prefill[0]["logits"], prefill[1]["logits"]], axis=-1)
    assert_close(logits, expected.logits, "float32", "prefill logits")
    layers = tiny_model.config.num_layers
    feeds = {}
    for rank in (0, 1):
        feeds[rank] = {"tokens": tokens[:, context:], "position_ids": positions[:, context:],
                       "attention_mask": mask[..., context:, :], "logit_positions": np.array([0])}
        for i in range(layers):
            feeds[rank][f"past_key_{i}"] = prefill[rank][f"present_key_{i}"]
            feeds[rank][f"past_value_{i}"] = prefill[rank][f"present_value_{i}"]
    decode = run_segments_on_ort(package, "step", feeds)
    logits = np.concatenate([decode[0]["logits"], decode[1]["logits"]], axis=-1)
    assert_close(logits, step.logits, "float32", "cached decode logits")


# --- weights: from the package's own file ------------------------------------------------------------


def test_weights_are_handed_over_from_the_package(packages):
    package = packages["bfloat16", 2]
    proto = graph(package, "step", rank=1)
    weights = dict(external_weights(proto, package, 1))
    assert sorted(weights) == package.graph_weights(1, "step")
    for name, array in weights.items():
        assert np.array_equal(array.view(np.uint8), package.tensor(1, name).view(np.uint8))


def test_a_weight_reference_outside_the_package_is_refused(packages):
    package = packages["float32", 1]
    proto = graph(package, "step")
    target = next(init for init in proto.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL)

    def tampered(key: str, value: str) -> onnx.ModelProto:
        copy_ = copy.deepcopy(proto)
        init = next(i for i in copy_.graph.initializer if i.name == target.name)
        for item in init.external_data:
            if item.key == key:
                item.value = value
        return copy_

    with pytest.raises(GlmcError, match=f"'{target.name}' points to '../../etc/passwd'"):
        external_weights(tampered("location", "../../etc/passwd"), package, 0)
    with pytest.raises(GlmcError, match="not to its place in weights.bin"):
        external_weights(tampered("offset", "0" if dict((i.key, i.value) for i in target.external_data)["offset"]
                                  != "0" else "4096"), package, 0)
    renamed = copy.deepcopy(proto)
    next(i for i in renamed.graph.initializer if i.name == target.name).name = "not.a.weight"
    with pytest.raises(GlmcError, match="'not.a.weight' is not one of the rank's weights"):
        external_weights(renamed, package, 0)


# --- the operator check of `glmc export --target tensorrt` ------------------------------------------


def test_operator_table_is_kept_with_its_source():
    table = json.loads((REPO / "passes" / "data" / "onnx_tensorrt_operators.json").read_text())
    assert table["source"].startswith("https://github.com/onnx/onnx-tensorrt/blob/")
    assert "10.1" in table["release"]
    loaded = operator_table()
    assert loaded.types["MatMul"] == {"FLOAT", "FLOAT16", "BFLOAT16"}
    assert {"INT8", "INT4"} <= loaded.types["DequantizeLinear"]
    assert "RotaryEmbedding" not in loaded.types and "NonMaxSuppression" in loaded.types


ALL_KEYS = [*TINY_KEYS, BENCH_KEY]


@pytest.mark.parametrize("key", ALL_KEYS, ids=["-".join(map(str, k)) for k in ALL_KEYS])
def test_operator_check_passes_on_every_tensorrt_package(packages, key):
    package = packages[key]
    for kind in ("step",):
        assert package.manifest["passes"][kind]["tensorrt_ops"] > 0  # it ran while exporting
        assert "tensorrt_ops" not in package.manifest["declined"][kind]
        for rank in range(package.tp_size):
            outcome = tensorrt_ops.run(ir.load(package.graph_path(rank, kind)), TARGETS["tensorrt"])
            assert outcome.count > 0 and outcome.declined == []


def test_operator_check_names_the_node_of_an_onnxruntime_graph(tiny_package):
    model = ir.load(Package.open(tiny_package).graph_path(0, "step"))
    with pytest.raises(UnsupportedByTensorRT, match=r"node 'node_RotaryEmbedding_\w+' \(RotaryEmbedding\): "
                                                    r"TensorRT's ONNX operator table .* does not list"):
        tensorrt_ops.run(model, TARGETS["tensorrt"])


def test_operator_check_refuses_a_com_microsoft_op(packages):
    model = ir.load(packages["float16", 1].graph_path(0, "step"))
    gelu = next(n for n in model.graph.all_nodes() if n.op_type == "Gelu")
    gelu.domain = "com.microsoft"  # ONNX Runtime's contrib Gelu
    model.opset_imports["com.microsoft"] = 1
    with pytest.raises(UnsupportedByTensorRT, match=f"node '{gelu.name}' \\(com.microsoft.Gelu\\): TensorRT's "
                                                    "ONNX parser has no ops of domain 'com.microsoft'"):
        tensorrt_ops.run(model, TARGETS["tensorrt"])


def small_model(nodes: list[ir.Node], inputs: list[ir.Value], outputs: list[ir.Value]) -> ir.Model:
    return ir.Model(ir.Graph(inputs, outputs, nodes=nodes, opset_imports={"": 23}), ir_version=10)


def value(name: str, dtype: ir.DataType, shape: list[int]) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def test_operator_check_refuses_a_dtype_tensorrt_lacks():
    a, b = value("a", ir.DataType.INT32, [2, 3]), value("b", ir.DataType.INT32, [3, 4])
    node = ir.node("MatMul", [a, b], name="int_matmul")
    node.outputs[0].type, node.outputs[0].shape = ir.TensorType(ir.DataType.INT32), ir.Shape([2, 4])
    with pytest.raises(UnsupportedByTensorRT, match="node 'int_matmul' \\(MatMul\\): 'a' is INT32, TensorRT's "
                                                    "MatMul takes BFLOAT16, FLOAT, FLOAT16"):
        tensorrt_ops.run(small_model([node], [a, b], node.outputs), TARGETS["tensorrt"])


@pytest.mark.parametrize("quantized", [ir.DataType.INT8, ir.DataType.INT4])
def test_operator_check_takes_weight_only_quantized_matmuls(quantized):
    """Weight-only int8/int4 will arrive as DequantizeLinear feeding MatMul: the check lets it through."""
    x = value("x", ir.DataType.FLOAT16, [2, 8])
    weight = value("w", quantized, [8, 4])
    scale = value("scale", ir.DataType.FLOAT16, [4])
    dequantize = ir.node("DequantizeLinear", [weight, scale], attributes={"axis": 1}, name="dq")
    dequantize.outputs[0].type, dequantize.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT16), ir.Shape([8, 4])
    matmul = ir.node("MatMul", [x, dequantize.outputs[0]], name="mm")
    matmul.outputs[0].type, matmul.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT16), ir.Shape([2, 4])
    outcome = tensorrt_ops.run(small_model([dequantize, matmul], [x, weight, scale], matmul.outputs),
                               TARGETS["tensorrt"])
    assert outcome.count == 2 and outcome.declined == []


def test_operator_check_runs_for_the_tensorrt_target_only(packages, tiny_package):
    onnxruntime_model = ir.load(Package.open(tiny_package).graph_path(0, "step"))
    _, counts, _ = optimize(onnxruntime_model, "onnxruntime")  # RotaryEmbedding and Attention stay
    assert "tensorrt_ops" not in counts
    _, counts, _ = optimize(ir.load(packages["float32", 1].graph_path(0, "step")), "tensorrt")
    assert counts["tensorrt_ops"] > 0


@pytest.mark.slow
def test_the_wheel_ships_the_operator_table(tmp_path):
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), "-q"], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("glmc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "glmc/passes/data/onnx_tensorrt_operators.json" in names
    assert "glmc/passes/tensorrt_ops.py" in names and "glmc/backends/tensorrt.py" in names


# --- on a GPU with TensorRT ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


def trt_model(package: Package, engines: Path, **options):
    import glmc

    return glmc.load(package.root, backend="tensorrt", device="cuda", cache_dir=engines, **options)


@needs_tensorrt_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_logits_match_the_reference(packages, engines, dtype):
    """Against the reference model on the same GPU in the package's dtype; in float16 within twice
    the reference's own distance from float32 (tests/tolerances.py's half_precision_limit)."""
    import glmc

    package = packages[dtype, 1]
    model = trt_model(package, engines)
    reference = glmc.load(package.root, backend="torch", dtype=dtype, device="cuda")
    exact = glmc.load(package.root, backend="torch", dtype="float32", device="cuda")
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, 1000, (2, 12)))
    positions = torch.arange(12).repeat(2, 1)
    mask = ~torch.ones(12, 12, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    caches = [None, None, None]
    for start, end in ((0, 10), (10, 11), (11, 12)):
        step = (tokens[:, start:end], positions[:, start:end], mask[..., start:end, :end])
        outputs = [m.logits(*step, cache) for m, cache in zip((model, reference, exact), caches)]
        (logits, _), (expected, _), (exact_logits, _) = outputs
        caches = [cache for _, cache in outputs]
        assert logits.device.type == "cuda"
        assert all(t.device.type == "cuda" for t in model.executable.cache_tensors(caches[0]))
        limit = None if dtype == "float32" else half_precision_limit(expected.cpu(), exact_logits.cpu(), dtype)
        assert_close(logits.cpu(), expected.cpu(), dtype, f"logits of positions {start}..{end - 1}", limit=limit)


@needs_tensorrt_gpu
def test_generation_matches_the_torch_backend(packages, engines):
    import glmc

    package = packages["float32", 1]
    model, reference = trt_model(package, engines), glmc.load(package.root, backend="torch", device="cuda")
    prompts = [[31, 32, 33, TINY_SPECIAL.mask, 34], [41, 42, TINY_SPECIAL.gmask]]
    # Greedy, then beam search (which reorders the cache in place).
    for strategy in (lambda: glmc.BaseStrategy(top_k=1), lambda: glmc.BeamSearchStrategy(num_beams=2)):
        got = [r.token_ids for r in model.generate(prompts, strategy(), out_seq_length=24)]
        want = [r.token_ids for r in reference.generate(prompts, strategy(), out_seq_length=24)]
        assert got == want


@needs_tensorrt_gpu
def test_engines_are_built_once_and_kept_outside_the_package(packages, engines):
    package = packages["float16", 1]
    lines: list[str] = []
    first = trt_model(package, engines, progress=lines.append)
    assert first.executable.collectives == trt_backend.SINGLE
    assert list((engines / "engines").glob("*.engine")) and not list(package.root.rglob("*.engine"))
    second = trt_model(package, engines, progress=lines.append)
    assert second.executable.build_seconds == 0.0
    assert any("engine from the cache" in line for line in lines)


@needs_tensorrt_gpu
def test_a_batch_beyond_the_profile_is_refused(packages, engines):
    model = trt_model(packages["float16", 1], engines)
    tokens = torch.zeros(9, 4, dtype=torch.long)
    mask = ~torch.ones(4, 4, dtype=torch.bool).tril()[None, None].repeat(9, 1, 1, 1)
    with pytest.raises(GlmcError, match="outside the engine's optimisation profile.*at most 8 rows"):
        model.logits(tokens, torch.arange(4).repeat(9, 1), mask)
