"""Build any target rank's weights from a checkpoint at any TP degree, streaming.

GLM-130B's tools/convert_tp.py loads every source shard it needs whole; here a
target rank is assembled one layer at a time, reopening (memory-mapping) only the
source shards that hold that layer, so the resident memory stays near one target
rank plus one layer, whatever the model size.

A quantized checkpoint changes TP degree without touching its codes, where that is
exact. A row split (QKV, GeGLU's first matrix: whole output rows) moves each row's
codes with its scale. A column split (the row-parallel `dense` and `dense_4h_to_h`:
each rank holds input columns of every row) keeps a row's scale, which GLM-130B takes
per rank after the split: a target rank inside one source rank keeps that rank's
scales (splitting further is exact), but rows merged from several source ranks need
one scale, exact only if those ranks' scales are equal (a checkpoint quantized at a
lower degree and split). Anything else is refused with the reason, before any work.
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
from glmc.checkpoint.layout import (QUANTIZED, Copy, Split, apply_copies, base_name, copy_plan, full_shapes,
                                    layer_index, split_of)
from glmc.fileio import atomic_directory, write_text_atomic
from glmc.memory import return_freed_memory
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
    bits = ckpt.info.quantization_bits
    if bits is not None:
        check_quantized_split(ckpt, mapping.tp_size, bits)
    shapes = stored_shapes(ckpt.config, bits)
    for group in weight_groups(ckpt):
        plans = {name: _plan(name, shapes[name], ckpt.tp_size, mapping) for name in _stored_names(ckpt, group)}
        out: dict[str, torch.Tensor] = {}
        for src_rank in sorted({c.src_rank for _, copies in plans.values() for c in copies}):
            state = ckpt.load_shard(src_rank)  # memory-mapped; unmapped when dropped below
            for name, (dim, copies) in plans.items():
                if name not in out:  # as stored: float dtype, int8 codes, fp16 scales
                    shape = list(shapes[name])
                    shape[dim] = sum(c.length for c in copies)
                    out[name] = torch.empty(shape, dtype=state[name].dtype)
                apply_copies(out[name], dim, copies, src_rank, state[name])
            del state
        yield out


def stored_shapes(config, bits: int | None) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's shape at TP 1: a quantized matrix's codes [N, K * bits / 8] and scales [N]."""
    shapes = {}
    for name, shape in full_shapes(config).items():
        if bits is not None and base_name(name) in QUANTIZED:
            shapes[name] = (shape[0], shape[1] * bits // 8)
            shapes[name + "_scale"] = (shape[0],)
        else:
            shapes[name] = shape
    return shapes


def _plan(name: str, shape: tuple[int, ...], src_tp: int, dst: Mapping) -> tuple[int, list[Copy]]:
    """`copy_plan`, except for the scales of a column split, which are per rank: the whole vector from
    the first source rank of the target's columns (`check_quantized_split` holds them equal)."""
    if name.endswith("_scale") and split_of(name[: -len("_scale")]) is Split.COLUMNS:
        _, copies = copy_plan(name[: -len("_scale")], (shape[0], dst.tp_size * src_tp), src_tp, dst)
        return 0, [Copy(copies[0].src_rank, 0, 0, shape[0])]
    return copy_plan(name, shape, src_tp, dst)


def check_quantized_split(ckpt: SatCheckpoint, target_tp: int, bits: int) -> None:
    """Refuse, before any work, a TP degree at which `ckpt`'s quantized matrices (or quantizing at
    `bits` a float checkpoint) could not be stored exactly."""
    config = ckpt.config
    widths = {"attention.query_key_value": config.hidden_size, "attention.dense": config.hidden_size // target_tp,
              "mlp.dense_h_to_4h": config.hidden_size, "mlp.dense_4h_to_h": config.inner_hidden_size // target_tp}
    if bits == 4:
        odd = [f"{name} ({width})" for name, width in widths.items() if width % 2]
        if odd:
            raise CheckpointError(f"{ckpt.root}: int4 packs two columns per byte; at TP {target_tp} the input "
                                  f"width of {odd[0]} is odd")
    if ckpt.info.quantization_bits is None or target_tp == ckpt.tp_size or ckpt.tp_size == 1:
        return
    merged = _merges(ckpt.tp_size, target_tp)
    if not merged:
        return  # every target rank's columns lie inside one source rank: its scales stay exact
    scales = {}
    for src_rank in sorted({r for group in merged for r in group}):
        state = ckpt.load_shard(src_rank)  # memory-mapped: only the scales are read
        scales[src_rank] = {name: state[name].clone() for name in state
                            if name.endswith("_scale") and split_of(name[: -len("_scale")]) is Split.COLUMNS}
        del state
    for group in merged:
        first = group[0]
        for name, scale in scales[first].items():
            for other in group[1:]:
                if not torch.equal(scale.view(torch.int16), scales[other][name].view(torch.int16)):
                    raise CheckpointError(
                        f"{ckpt.shard_path(other)}: {name} differs from source rank {first}'s: GLM-130B "
                        f"quantizes the row-parallel matrices per rank, so merging TP {ckpt.tp_size} into "
                        f"TP {target_tp} would need one scale per row where there are {len(group)}; convert "
                        f"to TP {ckpt.tp_size} or a multiple of it, or quantize the unquantized checkpoint")


def _merges(src_tp: int, dst_tp: int) -> list[list[int]]:
    """Per target rank of a column split: the source ranks it takes columns from, where more than one."""
    groups = []
    for rank in range(dst_tp):
        _, copies = copy_plan("attention.dense.weight", (1, src_tp * dst_tp), src_tp, Mapping(dst_tp, rank))
        sources = sorted({c.src_rank for c in copies})
        if len(sources) > 1:
            groups.append(sources)
    return groups


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
        check_quantized_split(ckpt, target_tp, quantization_bits)
    elif ckpt.info.quantization_bits is not None:
        check_quantized_split(ckpt, target_tp, ckpt.info.quantization_bits)
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
            return_freed_memory()
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
