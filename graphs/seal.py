"""A package is sealed: glmc reads only the files its manifest lists, all inside the package.

Three checks, in the order `Package.open` runs them, each refusal one `PackageError`
line naming the file and the problem:

* `check_manifest`: every field glmc reads is present, of its type and in its range,
  and the values agree with each other (ranks and TP degree, the config and the tensor
  table, the table and the weight file's size); every path is relative, normalised
  and listed in `files`. Nothing but the manifest has been opened yet.
* `check_files`: the folder holds exactly the listed files, as regular files (no
  symbolic link anywhere, so no path leaves the package), with the listed sizes and
  digests.
* `check_graph`: every external-data reference of a graph names its rank's weight
  file with the tensor table's offset and length, so that no reader (ONNX Runtime,
  onnx, onnx-ir) resolves one against the current directory or outside the package.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import re
from pathlib import Path
from typing import Any

import onnx

from glmc.config import GLMConfig, Mapping
from glmc.errors import GlmcError
from glmc.fileio import finite_number, sha256_of
from glmc.quantization import block_size_for
from glmc.sources import MANIFEST

FORMAT, FORMAT_VERSION = "glmc-package", 2  # 2: one step graph per rank (1 had prefill and decode)
GRAPHS = ("step",)  # the graphs of every rank (glmc.graphs.trace makes them)
ALIGNMENT = 4096  # page-aligned tensors can be memory-mapped in place
# Package dtype -> the ONNX element type of its tensors, and that type's size in bytes.
TENSOR_DTYPES = {"float32": ("FLOAT", 4), "float16": ("FLOAT16", 2), "bfloat16": ("BFLOAT16", 2)}
TRANSFORMS = ([], ["transpose"], ["group_qkv"], ["transpose", "group_qkv"])  # see package.STORAGE_FORMS
# A quantized package's codes and scales (passes/weight_only_matmul), and their element types' sizes:
# INT4 is packed two per byte.
QUANTIZED_TRANSFORMS = (["matmul_nbits"], ["dequantize_linear"], ["group_qkv", "matmul_nbits"],
                        ["group_qkv", "dequantize_linear"])
QUANTIZED_TENSOR_DTYPES = ("UINT8", "INT8", "INT4", "FLOAT16")
ITEM_BYTES = {"FLOAT": 4, "FLOAT16": 2, "BFLOAT16": 2, "UINT8": 1, "INT8": 1, "INT4": 0.5}
ROTARY_TABLES = ("rotary_cos", "rotary_sin")  # model buffers the graphs read from the weight file

# A GLM-130B manifest at TP 8 measures 2.6 MiB as `write_package` formats it: 845 tensors
# per rank (12 per layer x 70 layers, the embedding, the final layernorm, two rotary
# tables), each in the tensor table, in both graphs' weight lists and in the parameter
# map, with 11-digit offsets. 16 MiB leaves six times that.
MAX_MANIFEST_BYTES = 16 << 20
MAX_INT = 1 << 62  # byte counts and offsets: far beyond any file, far inside numpy's int64
MAX_CONFIG_INT = (1 << 31) - 1
MAX_TP = 4096
MAX_RANK_DIMS = 8
MAX_NAME = 1024  # characters of a tensor name or a path
MAX_TEXT = 4096  # characters of a free-text field (the source checkpoint's path)
SHA256 = re.compile(r"[0-9a-f]{64}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class PackageError(GlmcError):
    """A package that is missing, incomplete, or does not match its manifest."""


def show(value: Any, limit: int = 60) -> str:
    """A JSON value as a message quotes it: bounded, since a hostile manifest holds anything."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"an integer ({value})" if abs(value) < 10 ** 20 else "an integer"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({show(value)})"
    return "a list" if isinstance(value, list) else "an object"


def _field(where: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    if _IDENTIFIER.fullmatch(key):
        return f"{where}.{key}" if where else key
    return f"{where}[{show(key)}]"


class _Checker:
    """Field-by-field checks that raise one PackageError naming the manifest and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, problem: str):
        raise PackageError(f"{self.path}: {where}: {problem}" if where else f"{self.path}: {problem}")

    def get(self, obj: dict, key: str, where: str) -> Any:
        if key not in obj:
            self.fail(_field(where, key), "missing")
        return obj[key]

    def obj(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, f"expected an object, got {_kind(value)}")
        return value

    def array(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, f"expected a list, got {_kind(value)}")
        return value

    def integer(self, value: Any, where: str, low: int = 0, high: int = MAX_INT) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(where, f"expected an integer, got {_kind(value)}")
        if not low <= value <= high:
            self.fail(where, f"{show(value)} is outside [{low}, {high}]" if high < MAX_INT
                      else f"{show(value)} is less than {low}" if value < low else f"{show(value)} is absurdly large")
        return value

    def string(self, value: Any, where: str, limit: int = MAX_NAME) -> str:
        if not isinstance(value, str):
            self.fail(where, f"expected a string, got {_kind(value)}")
        if not 0 < len(value) <= limit:
            self.fail(where, f"expected 1 to {limit} characters, got {len(value)}")
        return value

    def choice(self, value: Any, where: str, options) -> str:
        if not isinstance(value, str) or value not in options:
            self.fail(where, f"expected one of {', '.join(options)}, got {_kind(value)}")
        return value

    def relpath(self, value: Any, where: str, files: dict) -> str:
        """A path inside the package: relative, normalised, no `..`, and listed in `files`."""
        self.string(value, where)
        if "\0" in value or "\\" in value:
            self.fail(where, f"{show(value)} is not a plain relative path (NUL or backslash)")
        if value.startswith("/"):
            self.fail(where, f"{show(value)} is an absolute path; a package names its files relative to itself")
        parts = value.split("/")
        if ".." in parts:
            self.fail(where, f"{show(value)} leaves the package ('..')")
        if any(part in ("", ".") for part in parts):
            self.fail(where, f"{show(value)} is not a normalised path (empty or '.' component)")
        if files is not None and value not in files:
            self.fail(where, f"{show(value)} is not listed in files")
        return value


def check_manifest(path: Path, manifest: Any) -> None:
    """Check the manifest read from `path` on its own, before any other file is opened."""
    c = _Checker(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackageError(f"{path}: not a glmc package manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"{path}: package format {show(manifest.get('format_version'))}, this glmc "
                           f"reads format {FORMAT_VERSION}; export it again")
    c.string(c.get(manifest, "glmc_version", ""), "glmc_version", 64)
    config = _check_config(c, c.get(manifest, "config", ""))
    tp_size = c.integer(c.get(manifest, "tp_size", ""), "tp_size", 1, MAX_TP)
    try:
        config.check_mapping(Mapping(tp_size, 0))
    except GlmcError as error:
        c.fail("tp_size", str(error))
    dtype = c.choice(c.get(manifest, "dtype", ""), "dtype", tuple(TENSOR_DTYPES))
    quantization = _check_quantization(c, manifest.get("quantization"))
    _check_target(c, c.get(manifest, "target", ""))
    _check_source(c, c.get(manifest, "source", ""))
    _check_pass_reports(c, manifest)

    files = c.obj(c.get(manifest, "files", ""), "files")
    for name, entry in files.items():
        where = _field("files", name)
        c.relpath(name, where, None)
        if name == MANIFEST:
            c.fail(where, "the manifest cannot list itself")
        entry = c.obj(entry, where)
        c.integer(c.get(entry, "bytes", where), _field(where, "bytes"))
        digest = c.get(entry, "sha256", where)
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            c.fail(_field(where, "sha256"), f"expected 64 lowercase hex digits, got {_kind(digest)}")

    _check_tokenizer(c, c.get(manifest, "tokenizer", ""), config, files)
    _check_special_tokens(c, c.get(manifest, "special_tokens", ""), config)
    ranks = c.array(c.get(manifest, "ranks", ""), "ranks")
    if len(ranks) != tp_size:
        c.fail("ranks", f"holds {len(ranks)} rank(s), but tp_size is {tp_size}")
    for rank, entry in enumerate(ranks):
        _check_rank(c, rank, entry, config, Mapping(tp_size, rank), dtype, files, quantization)


@dataclasses.dataclass(frozen=True)
class Quantization:
    bits: int
    block_size: int
    input_width: dict = dataclasses.field(default_factory=dict)  # matrix name -> K, of one rank


def _check_quantization(c: _Checker, value: Any) -> Quantization | None:
    """Absent or null: float weights. Otherwise GLM-130B's weight-only scheme at 8 or 4 bits, with the
    block size the graphs store the per-row scales at."""
    if value is None:
        return None
    quantization = c.obj(value, "quantization")
    bits = c.get(quantization, "bits", "quantization")
    if isinstance(bits, bool) or bits not in (4, 8):
        c.fail("quantization.bits", f"expected 4 or 8, got {_kind(bits)}")
    block = c.integer(c.get(quantization, "block_size", "quantization"), "quantization.block_size", 16, 1 << 16)
    if block & (block - 1):
        c.fail("quantization.block_size", f"{block} is not a power of two")
    for key in ("scheme", "codes_from"):
        if key in quantization:
            c.string(quantization[key], f"quantization.{key}", MAX_TEXT)
    return Quantization(bits, block)


def _check_config(c: _Checker, value: Any) -> GLMConfig:
    values = c.obj(value, "config")
    for field in dataclasses.fields(GLMConfig):
        where = _field("config", field.name)
        if field.name not in values:
            if field.default is dataclasses.MISSING:
                c.fail(where, "missing")
            continue
        if field.type in ("int", int):
            c.integer(values[field.name], where, 1, MAX_CONFIG_INT)
        elif not finite_number(values[field.name]) or values[field.name] <= 0:
            c.fail(where, f"expected a positive number, got {_kind(values[field.name])}")
    try:
        return GLMConfig.from_dict(values)
    except (GlmcError, TypeError, ValueError) as error:
        c.fail("config", str(error).removeprefix("config: "))


def _check_target(c: _Checker, value: Any) -> None:
    from glmc.passes.base import TARGETS

    target = c.obj(value, "target")
    c.choice(c.get(target, "name", "target"), "target.name", tuple(TARGETS))
    for key, flag in target.items():
        if key != "name" and not isinstance(flag, bool):
            c.fail(_field("target", key), f"expected true or false, got {_kind(flag)}")


def _check_source(c: _Checker, value: Any) -> None:
    source = c.obj(value, "source")
    c.string(c.get(source, "checkpoint", "source"), "source.checkpoint", MAX_TEXT)
    c.string(c.get(source, "iteration", "source"), "source.iteration", MAX_NAME)
    c.integer(c.get(source, "tp_size", "source"), "source.tp_size", 1, MAX_TP)


def _check_pass_reports(c: _Checker, manifest: dict) -> None:
    """Rewrite counts and decline reasons per graph (printed by `glmc export` and `glmc inspect`)."""
    for key in ("passes", "declined"):
        for kind, report in c.obj(c.get(manifest, key, ""), key).items():
            where = _field(key, kind)
            for name, value in c.obj(report, where).items():
                if key == "passes":
                    c.integer(value, _field(where, name))
                else:
                    for i, reason in enumerate(c.array(value, _field(where, name))):
                        c.string(reason, _field(_field(where, name), i), MAX_TEXT)


def _check_tokenizer(c: _Checker, value: Any, config: GLMConfig, files: dict) -> None:
    from glmc.tokenizer.ice import VARIANTS
    from glmc.tokenizer.special import COMMANDS

    if value is None:
        return
    tokenizer = c.obj(value, "tokenizer")
    c.relpath(c.get(tokenizer, "model", "tokenizer"), "tokenizer.model", files)
    c.integer(c.get(tokenizer, "text_offset", "tokenizer"), "tokenizer.text_offset", 0, config.vocab_size - 1)
    c.choice(c.get(tokenizer, "variant", "tokenizer"), "tokenizer.variant", VARIANTS)
    base = c.get(tokenizer, "command_base", "tokenizer")
    if base is not None:
        c.integer(base, "tokenizer.command_base", 0, config.vocab_size - len(COMMANDS))


def _check_special_tokens(c: _Checker, value: Any, config: GLMConfig) -> None:
    from glmc.tokenizer.special import COMMANDS

    if value is None:
        return
    ids = c.obj(value, "special_tokens")
    for name in (*COMMANDS, "eos"):
        c.integer(c.get(ids, name, "special_tokens"), _field("special_tokens", name), 0, config.vocab_size - 1)
    unknown = sorted(set(ids) - {*COMMANDS, "eos"})
    if unknown:
        c.fail(_field("special_tokens", unknown[0]), "not a command token")


def _check_rank(c: _Checker, rank: int, value: Any, config: GLMConfig, mapping: Mapping, dtype: str,
                files: dict, quantization: Quantization | None = None) -> None:
    where = f"ranks[{rank}]"
    entry = c.obj(value, where)
    if c.integer(c.get(entry, "rank", where), f"{where}.rank", 0, MAX_TP) != rank:
        c.fail(f"{where}.rank", f"{entry['rank']}, but it is entry {rank} of ranks")
    graphs = c.obj(c.get(entry, "graphs", where), f"{where}.graphs")
    if sorted(graphs) != sorted(GRAPHS):
        c.fail(f"{where}.graphs", f"expected the graphs {', '.join(GRAPHS)}, got {show(sorted(graphs))}")
    for kind, graph in graphs.items():
        c.relpath(graph, f"{where}.graphs.{kind}", files)
    weights = c.relpath(c.get(entry, "weights", where), f"{where}.weights", files)
    if weights in graphs.values():
        c.fail(f"{where}.weights", f"{show(weights)} is also a graph of the rank")
    tensors = _check_tensors(c, f"{where}.tensors", c.get(entry, "tensors", where), dtype,
                             files[weights]["bytes"], weights, quantization is not None)

    lists = c.obj(c.get(entry, "graph_weights", where), f"{where}.graph_weights")
    if sorted(lists) != sorted(GRAPHS):
        c.fail(f"{where}.graph_weights", f"expected the graphs {', '.join(GRAPHS)}, got {show(sorted(lists))}")
    for kind, names in lists.items():
        names = c.array(names, f"{where}.graph_weights.{kind}")
        for i, name in enumerate(names):
            if not isinstance(name, str) or name not in tensors:
                c.fail(f"{where}.graph_weights.{kind}[{i}]", f"{show(name)} is not in the rank's tensor table")
        if len(set(names)) != len(names):
            c.fail(f"{where}.graph_weights.{kind}", "lists a tensor twice")

    used = _check_parameters(c, f"{where}.parameters", c.get(entry, "parameters", where), tensors, config,
                             mapping, dtype, quantization)
    for name, tensor in tensors.items():
        if name in used:
            continue
        if name.split(".")[0] not in ROTARY_TABLES:
            c.fail(_field(f"{where}.tensors", name), "neither a parameter nor a rotary table")
        _check_dtype(c, _field(f"{where}.tensors", name), tensor, TENSOR_DTYPES[dtype][0], dtype)
        if not tensor["shape"] or tensor["shape"][0] != config.max_sequence_length:
            c.fail(_field(f"{where}.tensors", name), f"shape {tensor['shape']}, but a rotary table has a row per "
                                                     f"position (max_sequence_length {config.max_sequence_length})")


def _check_tensors(c: _Checker, where: str, value: Any, dtype: str, file_bytes: int, weights: str,
                   quantized: bool = False) -> dict:
    """The tensor table: every entry inside the weight file, aligned, sized by its shape, none overlapping.
    (Which dtype each tensor must have is checked with what it stores: `_check_parameters`.)"""
    onnx_dtype = TENSOR_DTYPES[dtype][0]
    allowed = (onnx_dtype, *QUANTIZED_TENSOR_DTYPES) if quantized else (onnx_dtype,)
    tensors = c.obj(value, where)
    spans = []
    for name, entry in tensors.items():
        at = _field(where, name)
        c.string(name, at)
        entry = c.obj(entry, at)
        offset = c.integer(c.get(entry, "offset", at), f"{at}.offset")
        length = c.integer(c.get(entry, "length", at), f"{at}.length")
        tensor_dtype = c.get(entry, "dtype", at)
        if tensor_dtype not in allowed:
            what = "a quantized package's codes, scales or" if quantized else "the"
            c.fail(f"{at}.dtype", f"expected {', '.join(allowed)} ({what} package's dtype {dtype}), "
                                  f"got {_kind(tensor_dtype)}")
        shape = c.array(c.get(entry, "shape", at), f"{at}.shape")
        if len(shape) > MAX_RANK_DIMS:
            c.fail(f"{at}.shape", f"{len(shape)} dimensions, more than {MAX_RANK_DIMS}")
        for i, dim in enumerate(shape):
            c.integer(dim, f"{at}.shape[{i}]")
        if tensor_dtype == "INT4" and (not shape or shape[-1] % 2):
            c.fail(f"{at}.shape", f"INT4 codes are stored two per byte along the last axis: {shape} has an odd "
                                  "(or no) last axis")
        size = math.ceil(math.prod(shape) * ITEM_BYTES[tensor_dtype])
        if length != size:
            c.fail(f"{at}.length", f"{length} bytes, but shape {shape} of {tensor_dtype} holds {size}")
        if offset % ALIGNMENT:
            c.fail(f"{at}.offset", f"{offset} is not a multiple of {ALIGNMENT} (tensors are written aligned)")
        if offset + length > file_bytes:
            c.fail(f"{at}.offset", f"bytes {offset} to {offset + length} run past the end of {weights} "
                                   f"({file_bytes} bytes)")
        spans.append((offset, length, name))
    spans.sort()
    for (offset, length, name), (next_offset, _, next_name) in zip(spans, spans[1:]):
        if offset + length > next_offset:
            c.fail(where, f"tensors {show(name)} and {show(next_name)} overlap in {weights}")
    return tensors


def _check_dtype(c: _Checker, where: str, tensor: dict, expected: str, dtype: str) -> None:
    if tensor["dtype"] != expected:
        c.fail(f"{where}.dtype", f"expected {expected} (the package's dtype is {dtype}), got {_kind(tensor['dtype'])}")


def _quantized_storage(name: str, shape: tuple[int, ...], transform: str, q: Quantization,
                       dtype: str) -> tuple[list[int], str]:
    """(shape, ONNX dtype) of a quantized parameter (GLM's codes [N, K * bits / 8] or scales [N]) stored
    for MatMulNBits or DequantizeLinear (glmc.quantization's layouts)."""
    n = shape[0]
    matrix = name[: -len("_scale")] if name.endswith("_scale") else name
    k = q.input_width[matrix]
    block = block_size_for(k, q.block_size)
    blocks = math.ceil(k / block)
    if name.endswith("_scale"):
        if transform == "matmul_nbits":
            return [n * blocks], TENSOR_DTYPES[dtype][0]  # in the activations' dtype
        return ([n], "FLOAT16") if q.bits == 8 else ([blocks, n], "FLOAT16")
    if transform == "matmul_nbits":
        return [n, blocks, block * q.bits // 8], "UINT8"
    return [k, n], "INT8" if q.bits == 8 else "INT4"


def _check_parameters(c: _Checker, where: str, value: Any, tensors: dict, config: GLMConfig,
                      mapping: Mapping, dtype: str = "float32", quantization: Quantization | None = None) -> set[str]:
    """The parameter map names every parameter of the rank once, stored in a tensor of its shape and
    dtype (a quantized package's codes and scales in one of the quantized layouts); returns the
    tensors that store them."""
    from glmc.checkpoint.layout import expected_parameters

    parameters = c.obj(value, where)
    # Parameters of a layer (and its four scales when quantized); the embedding and the final layernorm.
    per_layer, outside = 12 + (4 if quantization else 0), 3
    if len(parameters) != per_layer * config.num_layers + outside:  # before listing num_layers' names
        c.fail(where, f"{len(parameters)} parameters, but a {config.num_layers}-layer model"
                      f"{' quantized' if quantization else ''} has {per_layer * config.num_layers + outside}")
    expected = expected_parameters(config, mapping, quantization.bits if quantization else None)
    if quantization is not None:  # each matrix's input width K, for its scales' block count
        quantization = dataclasses.replace(quantization, input_width={
            name: want.shape[1] * 8 // quantization.bits for name, want in expected.items() if want.kind == "int8"})
    used = set()
    for name, entry in parameters.items():
        at = _field(where, name)
        if name not in expected:
            c.fail(at, "not a parameter of the model")
        entry = c.obj(entry, at)
        if expected[name].kind != "float":
            initializer = c.get(entry, "initializer", at)
            if not isinstance(initializer, str) or initializer not in tensors:
                c.fail(f"{at}.initializer", f"{show(initializer)} is not in the rank's tensor table")
            transforms = c.get(entry, "transforms", at)
            if transforms not in QUANTIZED_TRANSFORMS:
                c.fail(f"{at}.transforms", f"expected one of {show(QUANTIZED_TRANSFORMS)} for quantized codes and "
                                           f"scales, got {_kind(transforms)}")
            if "group_qkv" in transforms and not name.endswith(("query_key_value.weight", "query_key_value.weight_scale")):
                c.fail(f"{at}.transforms", "only the QKV projection has grouped columns")
            if initializer in used:
                c.fail(f"{at}.initializer", f"{show(initializer)} already stores another parameter")
            pair = name[: -len("_scale")] if name.endswith("_scale") else name + "_scale"
            partner = parameters.get(pair)
            if isinstance(partner, dict) and partner.get("transforms") != transforms:
                c.fail(f"{at}.transforms", f"{show(transforms)}, but {show(pair)} is stored as "
                                           f"{show(partner.get('transforms'))}: codes and scales go together")
            stored, stored_dtype = _quantized_storage(name, expected[name].shape, transforms[-1], quantization, dtype)
            if tensors[initializer]["shape"] != stored or tensors[initializer]["dtype"] != stored_dtype:
                c.fail(f"{at}.initializer", f"tensor {show(initializer)} is {tensors[initializer]['shape']} of "
                                            f"{tensors[initializer]['dtype']}, {transforms[-1]} stores this "
                                            f"parameter as {stored} of {stored_dtype}")
            used.add(initializer)
            continue
        forms = [entry] + [c.obj(extra, f"{at}.also[{i}]")
                           for i, extra in enumerate(c.array(entry.get("also", []), f"{at}.also"))]
        for i, form in enumerate(forms):
            _check_storage_form(c, at if i == 0 else f"{at}.also[{i - 1}]", name, form, tensors,
                                list(expected[name].shape), used, dtype)
    return used


def _check_storage_form(c: _Checker, at: str, name: str, form: dict, tensors: dict, shape: list[int],
                        used: set[str], dtype: str) -> None:
    """One tensor storing parameter `name` (of `shape`), transformed as `form` says."""
    initializer = c.get(form, "initializer", at)
    if not isinstance(initializer, str) or initializer not in tensors:
        c.fail(f"{at}.initializer", f"{show(initializer)} is not in the rank's tensor table")
    transforms = c.get(form, "transforms", at)
    if transforms not in TRANSFORMS:
        c.fail(f"{at}.transforms", f"expected one of {show(TRANSFORMS)}, got {_kind(transforms)}")
    if "group_qkv" in transforms and not name.endswith(("query_key_value.weight", "query_key_value.bias")):
        c.fail(f"{at}.transforms", "only the QKV projection has grouped columns")
    if initializer in used:
        c.fail(f"{at}.initializer", f"{show(initializer)} already stores another parameter")
    stored = shape[::-1] if "transpose" in transforms else shape
    if "transpose" in transforms and len(shape) != 2:
        c.fail(f"{at}.transforms", "only matrices are stored transposed")
    if tensors[initializer]["shape"] != stored:
        c.fail(f"{at}.initializer", f"tensor {show(initializer)} has shape {tensors[initializer]['shape']}, "
                                    f"the model's parameter stored this way has {stored}")
    _check_dtype(c, _field(at, "initializer"), tensors[initializer], TENSOR_DTYPES[dtype][0], dtype)
    used.add(initializer)


def check_files(root: Path, manifest: dict, full: bool) -> None:
    """The folder holds exactly the listed files, as regular files, with the listed sizes and digests.

    Digests: every file when `full`, else every file but the ranks' weight files (the
    graphs and the tokenizer, which are parsed whole anyway)."""
    files = manifest["files"]
    folders = {prefix for name in files for prefix in _parents(name)}
    sizes: dict[str, int] = {}
    pending = [""]
    while pending:  # only listed folders are entered, and the first unlisted entry ends the walk
        folder = pending.pop()
        try:
            with os.scandir(root / folder if folder else root) as entries:
                for entry in entries:
                    name = f"{folder}/{entry.name}" if folder else entry.name
                    path = root / name
                    if entry.is_symlink():
                        raise PackageError(f"{path}: a symbolic link; a package holds only its own files")
                    if entry.is_dir(follow_symlinks=False):
                        if name not in folders:
                            raise PackageError(f"{path}: a folder that {MANIFEST} does not list")
                        pending.append(name)
                    elif not entry.is_file(follow_symlinks=False):
                        raise PackageError(f"{path}: not a regular file")
                    elif name != MANIFEST:
                        if name not in files:
                            raise PackageError(f"{path}: a file that {MANIFEST} does not list")
                        sizes[name] = entry.stat(follow_symlinks=False).st_size
        except OSError as error:
            raise PackageError(f"{root / folder}: {error.strerror or error}") from None
    for name, expected in files.items():
        path = root / name
        if name not in sizes:
            raise PackageError(f"{path}: missing (listed in {MANIFEST})")
        if sizes[name] != expected["bytes"]:
            raise PackageError(f"{path}: {sizes[name]} bytes, the manifest says {expected['bytes']} "
                               "(truncated or replaced)")
    weights = {rank["weights"] for rank in manifest["ranks"]}
    for name, expected in files.items():
        if full or name not in weights:
            path = root / name
            try:
                digest = sha256_of(path)
            except OSError as error:
                raise PackageError(f"{path}: {error.strerror or error}") from None
            if digest != expected["sha256"]:
                raise PackageError(f"{path}: contents differ from the manifest (sha256 mismatch: edited or corrupt)")


def _parents(name: str) -> list[str]:
    parts = name.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def check_graph(root: Path, rank_entry: dict, kind: str) -> None:
    """Every external-data reference of the graph is a top-level initializer of the rank's
    tensor table, stored in the rank's weight file at the table's offset and length."""
    graph_name = rank_entry["graphs"][kind]
    path = root / graph_name
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and onnx's own errors share no base class
        raise PackageError(f"{path}: not a readable ONNX model ({type(error).__name__})") from None
    tensors = rank_entry["tensors"]
    # Locations resolve against the graph's folder: the weight file's path from there.
    location = posixpath.relpath(rank_entry["weights"], posixpath.dirname(graph_name) or ".")
    external = set()
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        name = show(tensor.name)
        if tensor.name not in tensors:
            raise PackageError(f"{path}: initializer {name} has external data but is not in the rank's "
                               "tensor table")
        entry = tensors[tensor.name]
        keys = [item.key for item in tensor.external_data]
        data = {item.key: item.value for item in tensor.external_data}
        if len(set(keys)) != len(keys) or set(keys) != {"location", "offset", "length"}:
            raise PackageError(f"{path}: initializer {name}: external data keys {show(keys)}, expected "
                               "location, offset and length once each")
        if data["location"] != location:
            raise PackageError(f"{path}: initializer {name}: external data location {show(data['location'])} "
                               f"is not the rank's weight file ({location})")
        for key in ("offset", "length"):
            digits = data[key]
            if not (digits.isascii() and digits.isdigit() and len(digits) <= 20) or int(digits) != entry[key]:
                raise PackageError(f"{path}: initializer {name}: external data {key} {show(data[key])}, the "
                                   f"tensor table says {entry[key]}")
        if (tensor.data_type != onnx.TensorProto.DataType.Value(entry["dtype"])
                or list(tensor.dims) != entry["shape"]):
            raise PackageError(f"{path}: initializer {name} is {list(tensor.dims)} of "
                               f"{onnx.TensorProto.DataType.Name(tensor.data_type)}, the tensor table says "
                               f"{entry['shape']} of {entry['dtype']}")
        external.add(tensor.name)
    listed = set(rank_entry["graph_weights"][kind])
    if external != listed:
        name = min(external ^ listed)
        raise PackageError(f"{path}: the graph {'does not read' if name in listed else 'reads'} weight "
                           f"{show(name)}, against graph_weights.{kind} in {MANIFEST}")
    for where, tensor in _inner_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise PackageError(f"{path}: {where}: tensor {show(tensor.name)} has external data; only the "
                               "rank's weights (top-level initializers) may")


def _inner_tensors(model: onnx.ModelProto):
    """Every tensor of `model` but its top-level initializers, with where it sits: in node
    attributes, sparse initializers, subgraphs and functions (walked without recursion)."""
    graphs = [(model.graph, "the graph")]
    nodes = [(node, f"function {show(function.name)}") for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph, where = graphs.pop()
            if graph is not model.graph:
                yield from ((f"an initializer of {where}", t) for t in graph.initializer)
            for sparse in graph.sparse_initializer:
                yield f"a sparse initializer of {where}", sparse.values
                yield f"a sparse initializer of {where}", sparse.indices
            nodes.extend((node, where) for node in graph.node)
            continue
        node, where = nodes.pop()
        for attribute in node.attribute:
            at = f"attribute {show(attribute.name)} of a {show(node.op_type, 40)[1:-1]} node in {where}"
            if attribute.HasField("t"):
                yield at, attribute.t
            yield from ((at, t) for t in attribute.tensors)
            sparse_tensors = list(attribute.sparse_tensors)
            if attribute.HasField("sparse_tensor"):
                sparse_tensors.append(attribute.sparse_tensor)
            for sparse in sparse_tensors:
                yield at, sparse.values
                yield at, sparse.indices
            if attribute.HasField("g"):
                graphs.append((attribute.g, f"a subgraph ({at})"))
            graphs.extend((g, f"a subgraph ({at})") for g in attribute.graphs)
