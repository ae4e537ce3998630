"""Build any target rank's weights from a checkpoint at any TP degree, streaming.

GLM-130B's tools/convert_tp.py loads every source shard it needs whole; here a
target rank is assembled one layer at a time, reopening (memory-mapping) only the
source shards that hold that layer, so the resident memory stays near one target
rank plus one layer, whatever the model size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch

from glmc.config import Mapping
from glmc.errors import CheckpointError
from glmc.quantization import SUPPORTED_BITS, quantize
from glmc.checkpoint.layout import QUANTIZED, apply_copies, base_name, copy_plan, full_shapes, layer_index
from glmc.fileio import atomic_directory, write_text_atomic
from glmc.checkpoint.sat import (
    CONFIG_FILE,
    SatCheckpoint,
    config_to_sat_args,
    save_shard,
    shard_name,
)

Progress = Callable[[str], None]


def weight_groups(ckpt: SatCheckpoint) -> list[list[str]]:
    """Parameter names in the order they are streamed: embedding, each layer, final norm."""
    groups: dict[object, list[str]] = {}
    for name in full_shapes(ckpt.config):
        index = layer_index(name)
        groups.setdefault(("layer", index) if index is not None else name.split(".")[0], []).append(name)
    return list(groups.values())


def iter_rank_weights(ckpt: SatCheckpoint, mapping: Mapping) -> Iterator[dict[str, torch.Tensor]]:
    """Yield `mapping`'s weights group by group (see `weight_groups`), as stored (dtype, quantization)."""
    ckpt.config.check_mapping(mapping)
    if mapping.tp_size == ckpt.tp_size:
        state = ckpt.load_shard(mapping.rank)
        for group in weight_groups(ckpt):
            yield {name: state[name] for name in _stored_names(ckpt, group)}
        return
    if ckpt.info.quantization_bits is not None:
        raise CheckpointError(
            f"{ckpt.root}: a quantized checkpoint cannot change TP degree ({ckpt.tp_size} -> "
            f"{mapping.tp_size}): its per-row scales belong to the source split; convert from the "
            "unquantized checkpoint instead")
    shapes = full_shapes(ckpt.config)
    for group in weight_groups(ckpt):
        plans = {name: copy_plan(name, shapes[name], ckpt.tp_size, mapping) for name in group}
        out = {}
        for name, (dim, copies) in plans.items():
            shape = list(shapes[name])
            shape[dim] = sum(c.length for c in copies)
            out[name] = torch.empty(shape, dtype=ckpt.info.float_dtype)
        for src_rank in sorted({c.src_rank for _, copies in plans.values() for c in copies}):
            state = ckpt.load_shard(src_rank)  # memory-mapped; unmapped when dropped below
            for name, (dim, copies) in plans.items():
                apply_copies(out[name], dim, copies, src_rank, state[name])
            del state
        yield out


def _stored_names(ckpt: SatCheckpoint, group: list[str]) -> list[str]:
    if ckpt.info.quantization_bits is None:
        return group
    return [n for name in group for n in ((name, name + "_scale") if base_name(name) in QUANTIZED else (name,))]


def quantize_weights(weights: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """GLM-130B's weight-only quantization of the four big matrices of each layer."""
    out = {}
    for name, tensor in weights.items():
        if base_name(name) in QUANTIZED:
            out[name], out[name + "_scale"] = quantize(tensor, bits)
        else:
            out[name] = tensor
    return out


def convert_checkpoint(
    ckpt: SatCheckpoint,
    out_dir: Path,
    target_tp: int,
    *,
    quantization_bits: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write `ckpt` at `target_tp` (optionally quantized) as a SAT checkpoint in `out_dir`."""
    out_dir = Path(out_dir)
    ckpt.config.check_mapping(Mapping(target_tp, 0))
    if quantization_bits is not None:
        if quantization_bits not in SUPPORTED_BITS:
            raise CheckpointError(f"--quantization-bit-width must be 4 or 8, got {quantization_bits}")
        if ckpt.info.quantization_bits is not None:
            raise CheckpointError(f"{ckpt.root}: already quantized to int{ckpt.info.quantization_bits}")
        config = ckpt.config
        columns = (config.hidden_size, config.hidden_size // target_tp, config.inner_hidden_size // target_tp)
        if quantization_bits == 4 and any(c % 2 for c in columns):
            raise CheckpointError(f"int4 packs two columns per byte: TP {target_tp} leaves an odd "
                                  "number of input columns in some matrix")
    if out_dir.resolve() == ckpt.root.resolve():
        raise CheckpointError(f"{out_dir}: the output must differ from the input checkpoint")
    with atomic_directory(out_dir, overwrite) as tmp:
        for rank in range(target_tp):
            state: dict[str, torch.Tensor] = {}
            for weights in iter_rank_weights(ckpt, Mapping(target_tp, rank)):
                if quantization_bits is not None:
                    weights = quantize_weights(weights, quantization_bits)
                state.update(weights)
                if progress:
                    progress(f"rank {rank}")
            save_shard(tmp / ckpt.iteration / shard_name(rank), state)
            del state
        metadata = dict(ckpt.metadata)
        tokenizer = metadata.get("tokenizer", {}).get("model")
        if tokenizer and (ckpt.root / tokenizer).is_file():
            shutil.copyfile(ckpt.root / tokenizer, tmp / tokenizer)
        sat_args = config_to_sat_args(ckpt.config, target_tp, metadata)
        write_text_atomic(tmp / CONFIG_FILE, json.dumps(sat_args, indent=2, ensure_ascii=False) + "\n")
        write_text_atomic(tmp / "latest", ckpt.iteration)
    return out_dir


def progress_steps(ckpt: SatCheckpoint, target_tp: int) -> int:
    return target_tp * len(weight_groups(ckpt))
