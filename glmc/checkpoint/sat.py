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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmc.config import PRESETS, GLMConfig, Mapping
from glmc.errors import CheckpointError, GlmcError
from glmc.checkpoint.layout import IGNORED, Expected, expected_parameters

SAT_PREFIX = "transformer."
CONFIG_FILE = "model_config.json"
_SHARD = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")

# GLMConfig fields under SAT's own argument names in model_config.json.
_REQUIRED_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length")
_OPTIONAL_ARGS = ("inner_hidden_size", "layernorm_epsilon")


def shard_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


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
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as error:
        reason = str(error).split("\n")[0]
        if "Weights only load failed" in reason or "Unsupported" in str(error):
            detail = re.search(r"(Unsupported[^.\n]*)", str(error))
            raise CheckpointError(
                f"{path}: refused to load: the pickle holds more than tensors "
                f"({detail.group(1) if detail else reason}); glmc never runs code from a checkpoint"
            ) from None
        raise CheckpointError(f"{path}: corrupt pickle ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).strip().split("\n")[0]
        raise CheckpointError(f"{path}: cannot read the shard, truncated or corrupt ({reason})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("module"), dict):
        raise CheckpointError(f"{path}: not a SAT shard (expected a dict with a 'module' state dict)")
    state = {}
    for key, value in payload["module"].items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
        if not key.startswith(SAT_PREFIX):
            raise CheckpointError(f"{path}: unknown key {key} (SAT keys start with '{SAT_PREFIX}')")
        name = key[len(SAT_PREFIX):]
        if not IGNORED.match(name):
            state[name] = value
    return state


def shard_info(path: Path, state: dict[str, torch.Tensor], config: GLMConfig, tp_size: int) -> ShardInfo:
    """Infer dtype and quantization of a shard, and check every key and shape against `config`."""
    float_dtypes = {v.dtype for k, v in state.items() if v.is_floating_point() and not k.endswith("_scale")}
    if len(float_dtypes) != 1:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in float_dtypes)) or "none"
        raise CheckpointError(f"{path}: expected one floating-point dtype across weights, found {names}")
    bits = None
    qkv = state.get("layers.0.attention.query_key_value.weight")
    if qkv is not None and qkv.dtype == torch.int8:
        bits = 8 if qkv.shape[-1] == config.hidden_size else 4
    info = ShardInfo(float_dtypes.pop(), bits)
    _check_against(path, state, expected_parameters(config, Mapping(tp_size, 0), bits), info, config, tp_size)
    return info


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
                   "scale": tensor.is_floating_point()}[want.kind]
        if not kind_ok:
            raise CheckpointError(f"{path}: {SAT_PREFIX}{name} has dtype "
                                  f"{str(tensor.dtype).removeprefix('torch.')}, expected {want.kind}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise CheckpointError(f"{path}: unknown key {SAT_PREFIX}{unknown[0]}"
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
    """GLMConfig from SAT's argument names in model_config.json, plus glmc's own section."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    missing = [k for k in _REQUIRED_ARGS if k not in values]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)}")
    if values.get("layernorm_order", "post") != "post" or values.get("position_encoding_2d"):
        raise CheckpointError(f"{path}: glmc runs GLM-130B's layout (post-LayerNorm, 1-D positions); this "
                              f"config has layernorm_order={values.get('layernorm_order')!r}, "
                              f"position_encoding_2d={values.get('position_encoding_2d')!r}")
    fields = {k: values[k] for k in _REQUIRED_ARGS + _OPTIONAL_ARGS if values.get(k) is not None}
    if "inner_hidden_size" not in fields:  # SAT's default for GLU models
        fields["inner_hidden_size"] = 4 * fields["hidden_size"] * 2 // 3
    try:
        config = GLMConfig(**fields)
    except (TypeError, ValueError, GlmcError) as error:
        raise CheckpointError(f"{path}: {error}") from None
    glmc_section = values.get("glmc", {})
    if not isinstance(glmc_section, dict):
        raise CheckpointError(f"{path}: 'glmc' must be an object")
    return config, glmc_section


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
        iteration = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not iteration or "/" in iteration or iteration in (".", ".."):
            raise CheckpointError(f"{latest}: expected an iteration name, found {iteration!r}")
        shard_dir = root / iteration
        if not shard_dir.is_dir():
            raise CheckpointError(f"{shard_dir}: no such directory (named by {latest})")
        ranks = sorted(int(m.group(1)) for f in os.listdir(shard_dir) if (m := _SHARD.match(f)))
        if not ranks:
            raise CheckpointError(f"{shard_dir}: no mp_rank_XX_model_states.pt shards")
        if ranks != list(range(len(ranks))):
            missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
            raise CheckpointError(f"{shard_dir}: shard {shard_name(missing[0])} is missing "
                                  f"(found ranks {', '.join(map(str, ranks))})")
        tp_size = len(ranks)

        metadata: dict[str, Any] = {}
        config_file = root / CONFIG_FILE
        if config is None and config_file.is_file():
            config, metadata = read_config_file(config_file)
        elif config_file.is_file():
            _, metadata = read_config_file(config_file)

        infos = []
        for rank in range(tp_size):
            path_r = shard_dir / shard_name(rank)
            state = load_state(path_r)
            if config is None:
                config = infer_config(path_r, state, tp_size)
            try:
                config.check_mapping(Mapping(tp_size, 0))
            except GlmcError as error:
                raise CheckpointError(f"{shard_dir}: {error}") from None
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

    def load_shard(self, rank: int) -> dict[str, torch.Tensor]:
        return load_state(self.shard_path(rank))


def save_shard(path: Path, state: dict[str, torch.Tensor]) -> None:
    """torch.save in SAT's layout, through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"module": {SAT_PREFIX + k: v.contiguous() for k, v in state.items()}}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
