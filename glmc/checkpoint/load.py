"""Build a reference model of one rank from a SAT checkpoint, and write models back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from glmc.config import GLMConfig, Mapping
from glmc.model import GLMModel
from glmc.model.parallel import Collectives
from glmc.checkpoint.convert import iter_rank_weights, quantize_weights
from glmc.errors import CheckpointError
from glmc.fileio import atomic_directory, write_text_atomic
from glmc.checkpoint.sat import (
    CONFIG_FILE,
    SatCheckpoint,
    config_to_sat_args,
    save_shard,
    shard_name,
)


def load_model(
    ckpt: SatCheckpoint,
    mapping: Mapping = Mapping(),
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    comm: Collectives | None = None,
    quantization_bits: int | None = None,
) -> GLMModel:
    """The model of rank `mapping.rank` at `mapping.tp_size`, resharding on the fly if needed.

    `quantization_bits` quantizes a float checkpoint's matrices as they load, from the weights
    as stored (as `glmc convert --quantization-bit-width` does); a quantized checkpoint loads
    its own codes."""
    dtype = dtype or ckpt.info.float_dtype
    stored = ckpt.info.quantization_bits
    if quantization_bits is not None and stored is not None and quantization_bits != stored:
        raise CheckpointError(f"{ckpt.root}: already quantized to int{stored}, cannot load as int{quantization_bits}")
    bits = stored if stored is not None else quantization_bits
    model = GLMModel(ckpt.config, mapping, dtype=dtype, quantization_bits=bits, comm=comm)
    state = {}
    for weights in iter_rank_weights(ckpt, mapping):
        if stored is None and bits is not None:
            weights = quantize_weights(weights, bits)
        for name, tensor in weights.items():
            # Float weights take the model dtype; int8 codes and fp16 scales stay as stored.
            keep = tensor.dtype == torch.int8 or name.endswith("_scale")
            state[name] = tensor.to(device=device, dtype=tensor.dtype if keep else dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.rotary_cos = model.rotary_cos.to(device)
    model.rotary_sin = model.rotary_sin.to(device)
    return model.eval()


def save_checkpoint(
    out_dir: str | Path,
    config: GLMConfig,
    rank_states: list[dict[str, torch.Tensor]],
    *,
    iteration: str = "1",
    metadata: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write per-rank state dicts (names as in GLMModel) as a SAT checkpoint, atomically.

    `metadata` becomes the "glmc" section of model_config.json; `files` are extra
    files (e.g. the tokenizer model) written beside it.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite) as tmp:
        for rank, state in enumerate(rank_states):
            save_shard(tmp / iteration / shard_name(rank), state)
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        sat_args = config_to_sat_args(config, len(rank_states), metadata)
        write_text_atomic(tmp / CONFIG_FILE, json.dumps(sat_args, indent=2, ensure_ascii=False) + "\n")
        write_text_atomic(tmp / "latest", iteration)
    return out_dir


def model_state(model: GLMModel) -> dict[str, torch.Tensor]:
    """A model's weights as SAT stores them (no rotary buffers, detached)."""
    return {k: v.detach() for k, v in model.state_dict().items()}
