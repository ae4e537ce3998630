"""How every GLM-130B weight is split across tensor-parallel ranks, as a table.

Resharding from any source TP degree to any target degree is a list of copies
(`copy_plan`): for each target slice, which source rank holds it and where.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch

from glmc.config import GLMConfig, Mapping


class Split(enum.Enum):
    REPLICATED = "replicated"  # every rank holds the whole tensor
    ROWS = "rows"  # contiguous blocks of dim 0 (vocab rows; whole heads of the head-major QKV)
    GLU_ROWS = "glu_rows"  # dim 0 is [x1; x2]: each rank holds [its x1 block; its x2 block]
    COLUMNS = "columns"  # contiguous blocks of dim 1 (inputs of the row-parallel matmuls)


# Parameter name (without "transformer." and "layers.N.") -> split.
SPLITS: dict[str, Split] = {
    "word_embeddings.weight": Split.ROWS,
    "final_layernorm.weight": Split.REPLICATED,
    "final_layernorm.bias": Split.REPLICATED,
    "input_layernorm.weight": Split.REPLICATED,
    "input_layernorm.bias": Split.REPLICATED,
    "attention.query_key_value.weight": Split.ROWS,
    "attention.query_key_value.bias": Split.ROWS,
    "attention.dense.weight": Split.COLUMNS,
    "attention.dense.bias": Split.REPLICATED,
    "post_attention_layernorm.weight": Split.REPLICATED,
    "post_attention_layernorm.bias": Split.REPLICATED,
    "mlp.dense_h_to_4h.weight": Split.GLU_ROWS,
    "mlp.dense_h_to_4h.bias": Split.GLU_ROWS,
    "mlp.dense_4h_to_h.weight": Split.COLUMNS,
    "mlp.dense_4h_to_h.bias": Split.REPLICATED,
}

# The matrices GLM-130B quantizes (weight-only); each gains a "<name>_scale".
QUANTIZED = (
    "attention.query_key_value.weight",
    "attention.dense.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)

# SAT keeps a recomputable rotary buffer in some checkpoints; it is never loaded.
IGNORED = re.compile(r"^layers\.\d+\.attention\.rotary_emb\.inv_freq$")

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def base_name(name: str) -> str:
    """'layers.3.mlp.dense_h_to_4h.weight' -> 'mlp.dense_h_to_4h.weight'."""
    match = _LAYER.match(name)
    return match.group(2) if match else name


def layer_index(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def split_of(name: str) -> Split:
    base = base_name(name)
    if base.endswith("_scale"):  # per-output-row scale: follows its matrix's rows
        matrix_split = SPLITS[base[: -len("_scale")]]
        return Split.REPLICATED if matrix_split is Split.COLUMNS else matrix_split
    return SPLITS[base]


@dataclass(frozen=True)
class Expected:
    shape: tuple[int, ...]
    kind: str  # "float", "int8" (quantized codes) or "scale" (fp16 per-row scales)


def full_shapes(config: GLMConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name and its shape at TP 1, in SAT's order."""
    h, i, v = config.hidden_size, config.inner_hidden_size, config.vocab_size
    per_layer = {
        "input_layernorm.weight": (h,),
        "input_layernorm.bias": (h,),
        "attention.query_key_value.weight": (3 * h, h),
        "attention.query_key_value.bias": (3 * h,),
        "attention.dense.weight": (h, h),
        "attention.dense.bias": (h,),
        "post_attention_layernorm.weight": (h,),
        "post_attention_layernorm.bias": (h,),
        "mlp.dense_h_to_4h.weight": (2 * i, h),
        "mlp.dense_h_to_4h.bias": (2 * i,),
        "mlp.dense_4h_to_h.weight": (h, i),
        "mlp.dense_4h_to_h.bias": (h,),
    }
    shapes = {"word_embeddings.weight": (v, h)}
    for layer in range(config.num_layers):
        shapes.update({f"layers.{layer}.{k}": s for k, s in per_layer.items()})
    shapes["final_layernorm.weight"] = (h,)
    shapes["final_layernorm.bias"] = (h,)
    return shapes


def rank_shape(full_shape: tuple[int, ...], split: Split, tp_size: int) -> tuple[int, ...]:
    if split is Split.REPLICATED:
        return full_shape
    dim = 1 if split is Split.COLUMNS else 0
    shape = list(full_shape)
    shape[dim] //= tp_size
    return tuple(shape)


def expected_parameters(config: GLMConfig, mapping: Mapping,
                        quantization_bits: int | None = None) -> dict[str, Expected]:
    """Name -> shape and kind of every tensor one rank's shard must hold."""
    expected = {}
    for name, shape in full_shapes(config).items():
        local = rank_shape(shape, split_of(name), mapping.tp_size)
        if quantization_bits is not None and base_name(name) in QUANTIZED:
            expected[name] = Expected((local[0], local[1] * quantization_bits // 8), "int8")
            expected[name + "_scale"] = Expected((local[0],), "scale")
        else:
            expected[name] = Expected(local, "float")
    return expected


def min_rank_bytes(config: GLMConfig, tp_size: int) -> int:
    """A lower bound of the bytes one rank's weights take in any layout glmc reads, in O(1).

    The four matrices of each layer count at half a byte per entry (packed int4), every
    other parameter at two (fp16 or bf16); scales and file overhead only add to it. Sums
    the shapes of `expected_parameters` without listing them (a config may claim 10^8 layers).
    """
    h, i, v, t = config.hidden_size, config.inner_hidden_size, config.vocab_size, tp_size
    matrices = (3 * h // t) * h + h * (h // t) + (2 * i // t) * h + h * (i // t)
    vectors = 6 * h + 3 * h // t + 2 * i // t  # layernorms, biases
    return config.num_layers * (matrices // 2 + 2 * vectors) + 2 * ((v // t) * h + 2 * h)


@dataclass(frozen=True)
class Copy:
    """Copy `length` entries along `dim` from source rank `src_rank` at `src_start` to `dst_start`."""

    src_rank: int
    src_start: int
    dst_start: int
    length: int


def _block_copies(length: int, src_tp: int, dst_tp: int, dst_rank: int,
                  src_offset: int = 0, dst_offset: int = 0) -> list[Copy]:
    """Copies that fill target block `dst_rank` of a dim of `length` split in contiguous blocks."""
    src_block, dst_block = length // src_tp, length // dst_tp
    begin, end = dst_rank * dst_block, (dst_rank + 1) * dst_block
    copies = []
    for src_rank in range(begin // src_block, (end - 1) // src_block + 1):
        lo, hi = max(begin, src_rank * src_block), min(end, (src_rank + 1) * src_block)
        copies.append(Copy(src_rank, src_offset + lo - src_rank * src_block, dst_offset + lo - begin, hi - lo))
    return copies


def copy_plan(name: str, full_shape: tuple[int, ...], src_tp: int, dst: Mapping) -> tuple[int, list[Copy]]:
    """(dim, copies) that build `dst`'s slice of `name` from a checkpoint at `src_tp`."""
    split = split_of(name)
    if split is Split.REPLICATED:
        return 0, [Copy(0, 0, 0, full_shape[0])]
    if split is Split.COLUMNS:
        return 1, _block_copies(full_shape[1], src_tp, dst.tp_size, dst.rank)
    if split is Split.ROWS:
        return 0, _block_copies(full_shape[0], src_tp, dst.tp_size, dst.rank)
    half = full_shape[0] // 2  # GLU: the x1 half, then the x2 half at each rank's midpoint
    return 0, (_block_copies(half, src_tp, dst.tp_size, dst.rank)
               + _block_copies(half, src_tp, dst.tp_size, dst.rank,
                               src_offset=half // src_tp, dst_offset=half // dst.tp_size))


def apply_copies(dst: torch.Tensor, dim: int, copies: list[Copy], src_rank: int, src: torch.Tensor) -> None:
    """Write the parts of `dst` that come from `src` (source rank `src_rank`)."""
    for c in copies:
        if c.src_rank == src_rank:
            dst.narrow(dim, c.dst_start, c.length).copy_(src.narrow(dim, c.src_start, c.length))
