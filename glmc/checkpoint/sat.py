"""SwissArmyTransformer checkpoints: `DIR/latest` + `DIR/<iter>/mp_rank_XX_model_states.pt`.

Each shard is `torch.save({"module": state_dict, ...})`, a pickle: it is only ever
read with `weights_only=True`, memory-mapped where the file format allows it, so
that opening a 32 GB shard reads only the tensors actually used.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmc.config import PRESETS, GLMConfig, Mapping
from glmc.errors import CheckpointError, GlmcError
from glmc.fileio import read_json, temporary_sibling
from glmc.checkpoint.layout import IGNORED, Expected, expected_parameters, min_rank_bytes

SAT_PREFIX = "transformer."
CONFIG_FILE = "model_config.json"
_SHARD = re.compile(r"^mp_rank_([0-9]{1,9})_model_states\.pt$")
MAX_LATEST_BYTES = 256  # `latest` holds an iteration name, a few bytes
MAX_CONFIG_BYTES = 1 << 20
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the model computes in

# GLMConfig fields under SAT's own argument names in model_config.json.
_REQUIRED_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length")
_OPTIONAL_ARGS = ("inner_hidden_size", "layernorm_epsilon")


def shard_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


def quoted(value: Any, limit: int = 60) -> str:
    """`value` for a message: repr, cut to `limit` characters (file contents can be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _json_value(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class ShardInfo:
    """What one shard holds: its float dtype and whether (and how) it is quantized."""

    float_dtype: torch.dtype
    quantization_bits: int | None

    def describe(self) -> str:
        bits = f"int{self.quantization_bits} weights" if self.quantization_bits else "no quantization"
        return f"{str(self.float_dtype).removeprefix('torch.')}, {bits}"


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The `module` state dict of one shard file, names without the `transformer.` prefix."""
    return read_state(path)[0]


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """`load_state`, and whether its tensors are memory-mapped from the file (a zip shard) rather
    than read into memory (a legacy one)."""
    check_stored(path)
    mapped = True
    try:
        # SAT stores its argparse Namespace beside the weights in some checkpoints:
        # allow that one harmless class, and nothing else that could run code.
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                # Legacy (pre-zip) files cannot be memory-mapped.
                payload = torch.load(path, map_location="cpu", weights_only=True)
                mapped = False
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as error:
        reason = _first_line(error)
        if "Weights only load failed" in reason or "Unsupported" in str(error):
            detail = re.search(r"(Unsupported[^.\n]{0,200})", str(error))
            raise CheckpointError(
                f"{path}: refused to load: the pickle holds more than tensors "
                f"({detail.group(1) if detail else reason}); glmc never runs code from a checkpoint"
            ) from None
        raise CheckpointError(f"{path}: corrupt pickle ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: cannot read the shard, truncated or corrupt ({_first_line(error)})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("module"), dict):
        raise CheckpointError(f"{path}: not a SAT shard (expected a dict with a 'module' state dict)")
    state = {}
    for key, value in payload["module"].items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: a state dict key is a {type(key).__name__}, not a name")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {quoted(key)} is a {type(value).__name__}, not a tensor")
        if not key.startswith(SAT_PREFIX):
            raise CheckpointError(f"{path}: unknown key {quoted(key)} (SAT keys start with '{SAT_PREFIX}')")
        name = key[len(SAT_PREFIX):]
        if not IGNORED.match(name):
            state[name] = value
    return state, mapped


def _first_line(error: BaseException, limit: int = 200) -> str:
    lines = str(error).strip().split("\n")
    return quoted(lines[0], limit)[1:-1] if lines[0] else type(error).__name__


def check_stored(path: Path) -> None:
    """Refuse a zip shard with compressed records.

    torch.save writes every record stored (uncompressed), and memory-mapping reads a
    record's bytes where they lie: a shard re-zipped with deflate would be read as its
    compressed bytes, silently. Reading it decompressed would hold it whole in memory, so
    such a shard is refused. Only the zip directory is read here."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(
                        f"{path}: zip record {quoted(info.filename)} is compressed (method "
                        f"{info.compress_type}); glmc memory-maps shards and reads only uncompressed "
                        "records, as torch.save writes them: save the shard again with torch.save")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (a legacy shard), or damaged: torch.load reports it


def shard_info(path: Path, state: dict[str, torch.Tensor], config: GLMConfig, tp_size: int) -> ShardInfo:
    """Infer dtype and quantization of a shard, and check every key and shape against `config`."""
    float_dtypes = {v.dtype for k, v in state.items() if v.is_floating_point() and not k.endswith("_scale")}
    if len(float_dtypes) != 1:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in float_dtypes)) or "none"
        raise CheckpointError(f"{path}: expected one floating-point dtype across weights, found {names}")
    if next(iter(float_dtypes)) not in FLOAT_DTYPES:
        raise CheckpointError(f"{path}: weights are {str(next(iter(float_dtypes))).removeprefix('torch.')}; "
                              "glmc reads float32, float16 and bfloat16 checkpoints")
    bits = None
    qkv = state.get("layers.0.attention.query_key_value.weight")
    if qkv is not None and qkv.dtype == torch.int8:
        bits = _quantization_bits(path, qkv, config, tp_size)
    info = ShardInfo(float_dtypes.pop(), bits)
    _check_against(path, state, expected_parameters(config, Mapping(tp_size, 0), bits), info, config, tp_size)
    return info


def _quantization_bits(path: Path, qkv: torch.Tensor, config: GLMConfig, tp_size: int) -> int:
    """GLM-130B's bit width (8 or 4) from the width of the first matrix's int8 codes, or one line saying
    why the codes fit neither."""
    key = f"{SAT_PREFIX}layers.0.attention.query_key_value.weight"
    width = qkv.shape[-1] if qkv.dim() == 2 else 0
    bits = {config.hidden_size: 8, config.hidden_size / 2: 4}.get(width)
    if bits is None:
        ratio = f"{8 * width / config.hidden_size:g}" if config.hidden_size else "?"
        raise CheckpointError(f"{path}: {key}: int8 codes {width} bytes wide for {config.hidden_size} input "
                              f"columns, a quantization bit width of {ratio}; GLM-130B's are 8 or 4")
    odd = [(name, k) for name, k in (("attention.dense", config.hidden_size // tp_size),
                                     ("mlp.dense_4h_to_h", config.inner_hidden_size // tp_size),
                                     ("attention.query_key_value", config.hidden_size)) if k % 2]
    if bits == 4 and odd:
        raise CheckpointError(f"{path}: {SAT_PREFIX}layers.0.{odd[0][0]}.weight: int4 codes pack two columns "
                              f"per byte, but the matrix has an odd column count ({odd[0][1]}) at TP {tp_size}")
    return bits


def _check_against(path: Path, state: dict[str, torch.Tensor], expected: dict[str, Expected],
                   info: ShardInfo, config: GLMConfig, tp_size: int) -> None:
    where = f"(config: {config.num_layers} layers, hidden {config.hidden_size}, TP {tp_size})"
    for name, want in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: missing {SAT_PREFIX}{name} {where}")
        tensor = state[name]
        if tuple(tensor.shape) != want.shape:
            raise CheckpointError(
                f"{path}: {SAT_PREFIX}{name} has shape {list(tensor.shape)}, expected "
                f"{list(want.shape)} {where}")
        kind_ok = {"float": tensor.dtype == info.float_dtype, "int8": tensor.dtype == torch.int8,
                   "scale": tensor.dtype == torch.float16}[want.kind]
        if not kind_ok:
            wanted = {"scale": "float16 (GLM-130B's per-row scales)", "int8": "int8 codes"}.get(want.kind, want.kind)
            raise CheckpointError(f"{path}: {SAT_PREFIX}{name} has dtype "
                                  f"{str(tensor.dtype).removeprefix('torch.')}, expected {wanted}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise CheckpointError(f"{path}: unknown key {SAT_PREFIX}{quoted(unknown[0])[1:-1]}"
                              + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                              + f" {where}")


def infer_config(path: Path, state: dict[str, torch.Tensor], tp_size: int) -> GLMConfig:
    """The preset whose every shape fits the shard (heads cannot be read off shapes)."""
    for config in PRESETS.values():
        try:
            config.check_mapping(Mapping(tp_size, 0))
            shard_info(path, state, config, tp_size)
        except GlmcError:
            continue
        return config
    raise CheckpointError(f"{path.parent.parent}: no {CONFIG_FILE} and the weights match no preset; "
                          f"pass --config (one of {', '.join(PRESETS)})")


def read_config_file(path: Path) -> tuple[GLMConfig, dict[str, Any]]:
    """GLMConfig from SAT's argument names in model_config.json, plus glmc's own section.

    Every value is checked for its type and range here, so that a hostile or mistyped file
    gives one line naming the key (a string, a float or true where an integer belongs, a
    layer count that would take hours to tabulate)."""
    values = read_json(path, CheckpointError, max_bytes=MAX_CONFIG_BYTES)
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    missing = [k for k in _REQUIRED_ARGS if k not in values]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    order, two_d = values.get("layernorm_order", "post"), values.get("position_encoding_2d")
    if order not in ("post", None) or two_d not in (False, None):
        raise CheckpointError(f"{path}: glmc runs GLM-130B's layout (post-LayerNorm, 1-D positions); this "
                              f"config has layernorm_order={_json_value(order)}, "
                              f"position_encoding_2d={_json_value(two_d)}")
    fields = {}
    for key in _REQUIRED_ARGS + ("inner_hidden_size",):
        value = values.get(key)
        if value is None and key == "inner_hidden_size":
            continue  # SAT writes null for "the default"
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(f"{path}: {key} must be an integer, got {_json_value(value)}")
        fields[key] = value
    epsilon = values.get("layernorm_epsilon")
    if epsilon is not None:
        fields["layernorm_epsilon"] = epsilon  # GLMConfig checks it
    if "inner_hidden_size" not in fields:  # SAT's default for GLU models
        fields["inner_hidden_size"] = 4 * fields["hidden_size"] * 2 // 3
    try:
        config = GLMConfig(**fields)
    except (TypeError, ValueError, GlmcError) as error:
        raise CheckpointError(f"{path}: {str(error).removeprefix('config: ')}") from None
    glmc_section = values.get("glmc", {})
    if not isinstance(glmc_section, dict):
        raise CheckpointError(f"{path}: 'glmc' must be an object")
    _check_glmc_section(path, glmc_section)
    return config, glmc_section


_ID_MAX = 1 << 31


def _check_glmc_section(path: Path, section: dict[str, Any]) -> None:
    """The tokenizer entry names a file inside the checkpoint; ids are integers."""
    def need(ok: bool, key: str, what: str, value: Any) -> None:
        if not ok:
            raise CheckpointError(f"{path}: glmc.{key} must be {what}, got {_json_value(value)}")

    def small_int(value: Any, low: int = 0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value < _ID_MAX

    tokenizer = section.get("tokenizer")
    if tokenizer is not None:
        need(isinstance(tokenizer, dict), "tokenizer", "an object", tokenizer)
        model = tokenizer.get("model")
        if model is not None:
            need(isinstance(model, str) and 0 < len(model) <= 255 and "/" not in model and "\\" not in model
                 and "\0" not in model and model not in (".", ".."),
                 "tokenizer.model", "the name of a file in the checkpoint folder", model)
        for key in ("text_offset", "command_base"):
            if tokenizer.get(key) is not None:
                need(small_int(tokenizer[key]), f"tokenizer.{key}", "a non-negative integer", tokenizer[key])
        variant = tokenizer.get("variant")
        if variant is not None:
            from glmc.tokenizer.ice import VARIANTS

            need(variant in VARIANTS, "tokenizer.variant", " or ".join(map(repr, VARIANTS)), variant)
    special = section.get("special_tokens")
    if special is not None:
        need(isinstance(special, dict), "special_tokens", "an object of command ids", special)
        for name, value in special.items():
            need(small_int(value), f"special_tokens.{quoted(name, 40)[1:-1]}", "a token id", value)


def config_to_sat_args(config: GLMConfig, tp_size: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    values: dict[str, Any] = {"model_class": "GLM130B"}
    values.update({arg: getattr(config, arg) for arg in _REQUIRED_ARGS + _OPTIONAL_ARGS})
    values.update({"layernorm_order": "post", "model_parallel_size": tp_size, "position_encoding_2d": False})
    if extra:
        values["glmc"] = extra
    return values


@dataclass(frozen=True)
class SatCheckpoint:
    """An opened, validated SAT checkpoint. Shards are read on demand, one at a time."""

    root: Path
    iteration: str
    config: GLMConfig
    tp_size: int
    info: ShardInfo
    metadata: dict[str, Any]  # the "glmc" section of model_config.json (tokenizer, special ids)

    @classmethod
    def open(cls, path: str | os.PathLike, config: GLMConfig | None = None) -> "SatCheckpoint":
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"{root}: no such checkpoint directory")
        latest = root / "latest"
        if not latest.is_file():
            raise CheckpointError(
                f"{root}: no 'latest' file (a SAT checkpoint holds DIR/latest with the iteration "
                "and DIR/<iteration>/mp_rank_XX_model_states.pt)")
        iteration = read_latest(latest)
        shard_dir = root / iteration
        if not shard_dir.is_dir():
            raise CheckpointError(f"{shard_dir}: no such directory (named by {latest})")
        ranks = set()
        for name in os.listdir(shard_dir):
            match = _SHARD.match(name)
            if match and name == shard_name(int(match.group(1))):
                ranks.add(int(match.group(1)))
        if not ranks:
            raise CheckpointError(f"{shard_dir}: no mp_rank_XX_model_states.pt shards")
        tp_size = len(ranks)
        absent = next((r for r in range(tp_size) if r not in ranks), None)
        if absent is not None:  # never a loop up to the largest rank: a file may claim rank 10^9
            found = ", ".join(map(str, sorted(ranks)[:8])) + (", ..." if tp_size > 8 else "")
            raise CheckpointError(f"{shard_dir}: shard {shard_name(absent)} is missing (found ranks {found})")

        metadata: dict[str, Any] = {}
        config_file = root / CONFIG_FILE
        if config is None and config_file.is_file():
            config, metadata = read_config_file(config_file)
        elif config_file.is_file():
            _, metadata = read_config_file(config_file)

        if config is not None:
            _check_fits(shard_dir, config, tp_size)
        infos = []
        for rank in range(tp_size):
            path_r = shard_dir / shard_name(rank)
            state = load_state(path_r)
            if config is None:
                config = infer_config(path_r, state, tp_size)
                _check_fits(shard_dir, config, tp_size)
            info = shard_info(path_r, state, config, tp_size)
            if infos and info != infos[0]:
                raise CheckpointError(
                    f"{path_r}: shards differ in layout: {shard_name(0)} has {infos[0].describe()}, "
                    f"{shard_name(rank)} has {info.describe()}")
            infos.append(info)
            del state  # unmaps the file
        return cls(root, iteration, config, tp_size, infos[0], metadata)

    def shard_path(self, rank: int) -> Path:
        return self.root / self.iteration / shard_name(rank)

    def shard_paths(self) -> list[Path]:
        return [self.shard_path(rank) for rank in range(self.tp_size)]

    def load_shard(self, rank: int) -> dict[str, torch.Tensor]:
        return load_state(self.shard_path(rank))


def read_latest(latest: Path) -> str:
    """The iteration name `latest` holds, read bounded (it is a few bytes) and checked."""
    try:
        with open(latest, "rb") as f:
            data = f.read(MAX_LATEST_BYTES + 1)
    except OSError as error:
        raise CheckpointError(f"{latest}: {error.strerror or error}") from None
    if len(data) > MAX_LATEST_BYTES:
        size = latest.stat().st_size
        raise CheckpointError(f"{latest}: {size:,} bytes, more than the iteration name it should hold "
                              f"(at most {MAX_LATEST_BYTES}; it starts {quoted(data[:40])})")
    iteration = data.decode("utf-8", errors="replace").strip()
    if (not iteration or "/" in iteration or "\\" in iteration or iteration in (".", "..")
            or not iteration.isprintable()):
        raise CheckpointError(f"{latest}: expected an iteration name, found {quoted(iteration)}")
    return iteration


def _check_fits(shard_dir: Path, config: GLMConfig, tp_size: int) -> None:
    """Refuse a config whose weights cannot fit the shard files, before anything is tabulated.

    The bound counts each of one rank's parameters at its smallest storage (int4 codes for
    the quantized matrices, two bytes for every other weight), so a real shard always holds
    at least that many bytes; O(1) whatever the config claims."""
    try:
        config.check_mapping(Mapping(tp_size, 0))
    except GlmcError as error:
        raise CheckpointError(f"{shard_dir}: {error}") from None
    need = min_rank_bytes(config, tp_size)
    for rank in range(tp_size):
        path = shard_dir / shard_name(rank)
        check_stored(path)  # a compressed shard may be small: say why it is refused
        try:
            size = path.stat().st_size
        except OSError as error:
            raise CheckpointError(f"{path}: {error.strerror or error}") from None
        if size < need:
            raise CheckpointError(
                f"{path}: {size:,} bytes, fewer than the {need:,} that the config ({config.num_layers} layers, "
                f"hidden {config.hidden_size}, GeGLU {config.inner_hidden_size}, vocab {config.vocab_size}, TP "
                f"{tp_size}) needs per shard: the shard is truncated or corrupt, or the config does not fit "
                "these weights")


def save_shard(path: Path, state: dict[str, torch.Tensor]) -> None:
    """torch.save in SAT's layout, through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        torch.save({"module": {SAT_PREFIX + k: v.contiguous() for k, v in state.items()}}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
