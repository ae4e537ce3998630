"""Sealed packages: a package reads only the files its manifest lists, all inside itself.

Every case tampers a real exported package on disk (a copy of `tiny_package`) the way
a broken tool or an attacker would, re-sealing the digests where an attacker would,
and expects one PackageError line naming the file and the problem from
`Package.open`, and one `glmc: error:` line (no traceback) from `glmc inspect` and
`glmc run --backend onnxruntime`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import helper, numpy_helper

from glmc.graphs import Package, PackageError
from glmc.graphs.package import MANIFEST

EMBEDDED_TOKENIZER = Path(__file__).parents[1] / "glmc" / "embedded" / "default" / "ice_text.model"


# --- tampering, for real ----------------------------------------------------------------------

def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text(encoding="utf-8"))


def _save_manifest(path: Path, manifest: dict) -> None:
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def _listing(file: Path) -> dict:
    """A files entry as an attacker would recompute it (hashlib here, not glmc's own helper)."""
    data = file.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _first_tensor(manifest: dict) -> tuple[str, dict]:
    """The rank-0 tensor stored first in the weight file."""
    tensors = manifest["ranks"][0]["tensors"]
    name = min(tensors, key=lambda n: tensors[n]["offset"])
    return name, tensors[name]


def _edit_graph(path: Path, kind: str, change) -> None:
    """Rewrite rank 0's `kind` graph with `change(model)` and re-seal its listing."""
    graph = path / "rank0" / f"{kind}.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    change(model)
    onnx.save(model, str(graph))
    manifest = _manifest(path)
    manifest["files"][f"rank0/{kind}.onnx"] = _listing(graph)
    _save_manifest(path, manifest)


def _external(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_external(tensor: onnx.TensorProto, **values: str) -> None:
    data = dict(_external(tensor), **values)
    del tensor.external_data[:]
    for key, value in data.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def missing_field(path, outside):
    manifest = _manifest(path)
    name, entry = _first_tensor(manifest)
    del entry["offset"]
    _save_manifest(path, manifest)
    return ["manifest.json", f"ranks[0].tensors['{name}'].offset: missing"]


def missing_top_level_field(path, outside):
    manifest = _manifest(path)
    del manifest["files"]
    _save_manifest(path, manifest)
    return ["manifest.json", "files: missing"]


def wrong_type(path, outside):
    manifest = _manifest(path)
    manifest["tp_size"] = "1"
    _save_manifest(path, manifest)
    return ["manifest.json", "tp_size: expected an integer, got a string ('1')"]


def wrong_type_in_config(path, outside):
    manifest = _manifest(path)
    manifest["config"]["num_layers"] = 3.0
    _save_manifest(path, manifest)
    return ["manifest.json", "config.num_layers: expected an integer, got a number (3.0)"]


def unknown_config_field(path, outside):
    manifest = _manifest(path)
    manifest["config"]["num_experts"] = 8  # GLMConfig.from_dict's own refusal, naming the manifest
    _save_manifest(path, manifest)
    return ["manifest.json", "config: unknown field(s) \"num_experts\""]


def ranks_disagree_with_tp_size(path, outside):
    manifest = _manifest(path)
    manifest["tp_size"] = 2
    _save_manifest(path, manifest)
    return ["manifest.json", "ranks: holds 1 rank(s), but tp_size is 2"]


def config_not_divisible(path, outside):
    manifest = _manifest(path)
    manifest["tp_size"] = 3
    _save_manifest(path, manifest)
    return ["manifest.json", "tp_size: tensor-parallel degree 3 does not divide num_attention_heads 8"]


def wrong_rank_index(path, outside):
    manifest = _manifest(path)
    manifest["ranks"][0]["rank"] = 1
    _save_manifest(path, manifest)
    return ["manifest.json", "ranks[0].rank: 1, but it is entry 0 of ranks"]


def unknown_dtype(path, outside):
    manifest = _manifest(path)
    name, entry = _first_tensor(manifest)
    entry["dtype"] = "INT4"
    _save_manifest(path, manifest)
    return ["manifest.json", f"ranks[0].tensors['{name}'].dtype: expected FLOAT"]


def special_token_out_of_range(path, outside):
    manifest = _manifest(path)
    manifest["special_tokens"]["eos"] = 5000  # the vocabulary has 1024 ids
    _save_manifest(path, manifest)
    return ["manifest.json", "special_tokens.eos: 5000 is outside [0, 1023]"]


def absolute_path(path, outside):
    shutil.copyfile(path / "rank0" / "weights.bin", outside / "weights.bin")
    manifest = _manifest(path)
    target = str(outside / "weights.bin")
    manifest["ranks"][0]["weights"] = target
    manifest["files"][target] = manifest["files"].pop("rank0/weights.bin")
    _save_manifest(path, manifest)
    return ["manifest.json", "is an absolute path"]


def dot_dot(path, outside):
    shutil.copyfile(path / "rank0" / "weights.bin", outside / "weights.bin")
    manifest = _manifest(path)
    target = f"../{outside.name}/weights.bin"  # the planted copy, next to the package
    manifest["ranks"][0]["weights"] = target
    manifest["files"][target] = manifest["files"].pop("rank0/weights.bin")
    _save_manifest(path, manifest)
    return ["manifest.json", "leaves the package ('..')"]


def dot_dot_inside(path, outside):
    manifest = _manifest(path)  # resolves inside the package, but is not the listed spelling
    manifest["ranks"][0]["graphs"]["step"] = "rank0/../rank0/step.onnx"
    _save_manifest(path, manifest)
    return ["manifest.json", "ranks[0].graphs.step", "leaves the package ('..')"]


def symlink_out(path, outside):
    weights = path / "rank0" / "weights.bin"
    shutil.move(weights, outside / "weights.bin")  # same bytes: sizes and digests still match
    weights.symlink_to(outside / "weights.bin")
    return [str(weights), "a symbolic link"]


def symlinked_folder(path, outside):
    shutil.move(path / "rank0", outside / "rank0")
    (path / "rank0").symlink_to(outside / "rank0", target_is_directory=True)
    return [str(path / "rank0"), "a symbolic link"]


def unlisted_file(path, outside):
    (path / "rank0" / "extra.onnx").write_bytes(b"not listed")
    return [str(path / "rank0" / "extra.onnx"), "a file that manifest.json does not list"]


def unlisted_folder(path, outside):
    (path / "rank1").mkdir()
    return [str(path / "rank1"), "a folder that manifest.json does not list"]


def external_data_outside(path, outside):
    shutil.copyfile(path / "rank0" / "weights.bin", outside / "weights.bin")

    def point_outside(model):
        tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        _set_external(tensor, location=f"../../{outside.name}/weights.bin")

    _edit_graph(path, "step", point_outside)
    return [str(path / "rank0" / "step.onnx"), f"external data location '../../{outside.name}/weights.bin'",
            "is not the rank's weight file (weights.bin)"]


def external_data_in_the_current_directory(path, outside):
    """A graph constant moved into a Constant node whose value is external data at a relative
    location: given a graph as bytes, ONNX Runtime resolves it against the current directory,
    where `planted.bin` waits (the tests run from there)."""
    def plant(model):
        tensor = next(t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
        model.graph.initializer.remove(tensor)
        value = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                 data_location=onnx.TensorProto.EXTERNAL)
        size = len(numpy_helper.to_array(tensor).tobytes())
        _set_external(value, location="planted.bin", offset="0", length=str(size))
        model.graph.node.insert(0, helper.make_node("Constant", [], [tensor.name], value=value))
        (outside / "planted.bin").write_bytes(b"\x7f" * size)

    _edit_graph(path, "step", plant)
    return [str(path / "rank0" / "step.onnx"), "attribute 'value' of a Constant node", "has external data"]


def initializer_in_the_current_directory(path, outside):
    def plant(model):
        tensor = next(t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
        size = len(numpy_helper.to_array(tensor).tobytes())
        tensor.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        _set_external(tensor, location="planted.bin", offset="0", length=str(size))
        (outside / "planted.bin").write_bytes(b"\x7f" * size)

    _edit_graph(path, "step", plant)
    return [str(path / "rank0" / "step.onnx"), "has external data but is not in the rank's tensor table"]


def graph_offset_disagrees(path, outside):
    manifest = _manifest(path)
    tensors = manifest["ranks"][0]["tensors"]

    def read_another_tensor(model):
        tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        other = next(n for n in tensors if n != tensor.name)
        _set_external(tensor, offset=str(tensors[other]["offset"]))

    _edit_graph(path, "step", read_another_tensor)
    return [str(path / "rank0" / "step.onnx"), "external data offset", "the tensor table says"]


def negative_offset(path, outside):
    manifest = _manifest(path)
    name, entry = _first_tensor(manifest)
    entry["offset"] = -4096  # numpy would read 4096 bytes from the end of the file
    _save_manifest(path, manifest)
    return ["manifest.json", f"ranks[0].tensors['{name}'].offset: -4096 is less than 0"]


def length_mismatch(path, outside):
    manifest = _manifest(path)
    name, entry = _first_tensor(manifest)
    entry["length"] += 4096
    _save_manifest(path, manifest)
    return ["manifest.json", f"ranks[0].tensors['{name}'].length: {entry['length']} bytes, but shape"]


def offset_past_the_end(path, outside):
    manifest = _manifest(path)
    name, entry = _first_tensor(manifest)
    size = manifest["files"]["rank0/weights.bin"]["bytes"]
    entry["offset"] = -size % 4096 + size  # aligned, at the end of the file
    _save_manifest(path, manifest)
    return ["manifest.json", f"ranks[0].tensors['{name}'].offset", "run past the end of rank0/weights.bin"]


def overlapping_tensors(path, outside):
    manifest = _manifest(path)
    tensors = manifest["ranks"][0]["tensors"]
    first, second = sorted(tensors, key=lambda n: tensors[n]["offset"])[:2]
    tensors[second]["offset"] = tensors[first]["offset"]
    _save_manifest(path, manifest)
    return ["manifest.json", "overlap in rank0/weights.bin"]


def parameter_shape_disagrees(path, outside):
    manifest = _manifest(path)
    entry = manifest["ranks"][0]["parameters"]["final_layernorm.weight"]
    entry["initializer"] = manifest["ranks"][0]["parameters"]["word_embeddings.weight"]["initializer"]
    _save_manifest(path, manifest)
    return ["manifest.json", "ranks[0].parameters['final_layernorm.weight'].initializer"]


CASES = [missing_field, missing_top_level_field, wrong_type, wrong_type_in_config, unknown_config_field,
         ranks_disagree_with_tp_size, config_not_divisible, wrong_rank_index, unknown_dtype,
         special_token_out_of_range, absolute_path, dot_dot, dot_dot_inside, symlink_out, symlinked_folder,
         unlisted_file, unlisted_folder, external_data_outside, external_data_in_the_current_directory,
         initializer_in_the_current_directory, graph_offset_disagrees, negative_offset, length_mismatch,
         offset_past_the_end, overlapping_tensors, parameter_shape_disagrees]


@pytest.fixture
def tampered(request, tiny_package, tmp_path, monkeypatch):
    """(package, outside folder, expected message fragments); the current directory is `outside`,
    holding whatever the tampering planted there."""
    path = Path(shutil.copytree(tiny_package, tmp_path / "pkg"))
    outside = tmp_path / "outside"
    outside.mkdir()
    fragments = request.param(path, outside)
    monkeypatch.chdir(outside)
    return path, outside, fragments


def _refused(path: Path, fragments: list[str], **options) -> str:
    with pytest.raises(PackageError) as info:
        Package.open(path, **options)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("tampered", CASES, ids=[c.__name__ for c in CASES], indirect=True)
def test_package_open_refuses_in_one_line(tampered):
    path, _, fragments = tampered
    _refused(path, fragments)


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "glmc", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# Through the command line, one case of each class (each costs two processes).
CLI_CASES = [missing_field, wrong_type, absolute_path, dot_dot, symlink_out, unlisted_file, external_data_outside,
             external_data_in_the_current_directory, negative_offset, length_mismatch, offset_past_the_end]


@pytest.mark.parametrize("tampered", CLI_CASES, ids=[c.__name__ for c in CLI_CASES], indirect=True)
def test_cli_refuses_in_one_line(tampered):
    path, outside, fragments = tampered
    # From the folder holding the planted files, the two commands side by side.
    runs = [_cli(["inspect", str(path)], outside),
            _cli(["run", "--package", str(path), "--backend", "onnxruntime", "--no-output-files", "x"], outside)]
    for run in runs:
        stdout, stderr = run.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("glmc: error: "), stderr
        assert "Traceback" not in stderr and not stdout
        for fragment in fragments:
            assert fragment in lines[0], lines[0]


# --- what stays accepted, what each verification level reads ---------------------------------

def test_an_intact_copy_opens_from_anywhere(tiny_package, tmp_path, monkeypatch):
    path = Path(shutil.copytree(tiny_package, tmp_path / "pkg"))
    monkeypatch.chdir(tmp_path)
    Package.open(path, verify="full")
    link = tmp_path / "link"  # the package folder itself may be reached through a link
    link.symlink_to(path, target_is_directory=True)
    assert Package.open(link).manifest == Package.open(path).manifest


def _with_tokenizer(tiny_package, tmp_path) -> Path:
    """tiny_package with a tokenizer listed the way `glmc export` lists one."""
    path = Path(shutil.copytree(tiny_package, tmp_path / "pkg"))
    (path / "tokenizer").mkdir()
    shutil.copyfile(EMBEDDED_TOKENIZER, path / "tokenizer" / "ice_text.model")
    manifest = _manifest(path)
    manifest["tokenizer"] = {"text_offset": 0, "variant": "icetk", "command_base": 1000,
                             "model": "tokenizer/ice_text.model"}
    manifest["files"]["tokenizer/ice_text.model"] = _listing(path / "tokenizer" / "ice_text.model")
    _save_manifest(path, manifest)
    return path


def test_default_verify_hashes_the_tokenizer(tiny_package, tmp_path):
    path = _with_tokenizer(tiny_package, tmp_path)
    Package.open(path)
    model = path / "tokenizer" / "ice_text.model"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    _refused(path, [str(model), "sha256 mismatch"])


def test_tokenizer_path_must_be_listed(tiny_package, tmp_path):
    path = _with_tokenizer(tiny_package, tmp_path)
    manifest = _manifest(path)
    manifest["tokenizer"]["model"] = "../ice_text.model"
    _save_manifest(path, manifest)
    _refused(path, ["manifest.json", "tokenizer.model", "leaves the package"])
    manifest["tokenizer"]["model"] = "tokenizer/other.model"
    _save_manifest(path, manifest)
    _refused(path, ["manifest.json", "tokenizer.model: 'tokenizer/other.model' is not listed in files"])


def test_full_verify_hashes_the_weights_and_the_default_their_sizes(tiny_package, tmp_path):
    path = Path(shutil.copytree(tiny_package, tmp_path / "pkg"))
    weights = path / "rank0" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[5] ^= 0x01
    weights.write_bytes(bytes(data))
    Package.open(path)  # sizes match: the default does not read every weight byte
    _refused(path, [str(weights), "sha256 mismatch"], verify="full")


def test_an_oversized_manifest_is_refused_before_it_is_parsed(tiny_package, tmp_path):
    path = Path(shutil.copytree(tiny_package, tmp_path / "pkg"))
    manifest = _manifest(path)
    manifest["padding"] = "x" * (16 << 20)
    _save_manifest(path, manifest)
    _refused(path, [str(path / MANIFEST), "more than the 16,777,216 such a file may hold"])


def test_a_symlinked_manifest_is_refused_unread(tiny_package, tmp_path):
    path = Path(shutil.copytree(tiny_package, tmp_path / "pkg"))
    (tmp_path / "elsewhere.txt").write_text("not the package's to read")
    (path / MANIFEST).unlink()
    (path / MANIFEST).symlink_to(tmp_path / "elsewhere.txt")
    _refused(path, [str(path / MANIFEST), "a symbolic link"])  # not "not valid JSON": it was never read


def test_tensor_never_reads_outside_its_entry(tiny_package, tmp_path):
    path = Path(shutil.copytree(tiny_package, tmp_path / "pkg"))
    package = Package.open(path)
    name, entry = max(package.manifest["ranks"][0]["tensors"].items(), key=lambda item: item[1]["offset"])
    assert package.tensor(0, name).nbytes == entry["length"]
    weights = path / "rank0" / "weights.bin"
    weights.write_bytes(weights.read_bytes()[: entry["offset"] + 8])  # shrunk after the package was opened
    with pytest.raises(PackageError, match=r"weights\.bin: tensor .* lies outside the file"):
        package.tensor(0, name)
