"""Compiled packages: per-rank graphs, each rank's weights stored once, and a manifest.

    PACKAGE/manifest.json            what is inside, how it was made, size and sha256 of every file
    PACKAGE/tokenizer/ice_text.model (when the source has one)
    PACKAGE/rank0/step.onnx          the graph of rank 0 (see glmc.graphs.trace), weights as external data in ...
    PACKAGE/rank0/weights.bin        ... one file, tensors 4 KiB-aligned
    PACKAGE/rank1/...

A package appears only once complete (written to a temporary folder, then
renamed). A package is sealed (see `seal`): opening one checks the manifest's
fields, that the folder holds exactly the files it lists (no symbolic link, no
path out of the folder), their sizes always, the digests of the graphs and the
tokenizer always, the digests of the weights on request (`verify="full"`), the
tensor table against the weight files and every external-data reference of
the graphs against the tensor table.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir
import torch

from glmc import __version__
from glmc.config import GLMConfig, Mapping
from glmc.fileio import atomic_directory, read_json, sha256_of, write_text_atomic
from glmc.graphs.seal import (ALIGNMENT, FORMAT, FORMAT_VERSION, GRAPHS, MAX_MANIFEST_BYTES, PackageError, check_files,
                              check_graph, check_manifest)
from glmc.sources import MANIFEST
from glmc.quantization import (BLOCK_SIZE, check_bits, from_block_scales, from_dequantize_linear_layout,
                               from_dequantize_linear_scales, from_matmul_nbits_layout)

WEIGHTS = "weights.bin"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRANSPOSED = ".T"  # an initializer `W.T` holds the parameter `W` transposed (passes.prepack_weights)
GROUPED = ".qkv"  # ... with its QKV output columns grouped [q | k | v] (passes.attention_3d)
NBITS = ".nbits"  # quantized codes or scales in MatMulNBits' layout (passes.weight_only_matmul)
DEQUANTIZE = ".dq"  # ... in DequantizeLinear's layout
# Weights that are not floating-point: quantized codes (int8, packed int4 as uint8 or ONNX INT4).
QUANTIZED_DTYPES = (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4)


def _rank_dir(rank: int) -> str:
    return f"rank{rank}"


def is_rank_weight(name: str, model_tensors: set[str]) -> bool:
    """Whether initializer `name` holds one of the rank's model tensors (a parameter or buffer of
    the reference model, possibly in a pass's storage form, `W.T`, `W.qkv`, `table.half`...).

    Only those are the same tensor under the same name in every graph of the rank, since
    both graphs are traced from one model. Every other initializer is a constant of its
    own graph (the exporter numbers them `val_N` per graph), so equal names in two graphs
    mean nothing.
    """
    return name in model_tensors or any(name.startswith(t + ".") for t in model_tensors)


def write_weights(models: list[ir.Model], path: Path, model_tensors: set[str]) -> dict[str, dict[str, Any]]:
    """Write every rank weight of `models` (floating-point, or quantized codes) once into `path`;
    point the models at it.

    Returns the tensor table: name -> offset, length, dtype, shape. Lazy tensors (the
    pre-transposed weights, the quantized layouts) are computed here, one at a time; 4-bit
    tensors are written packed, two per byte, as ONNX stores them. Graph constants stay
    inside their graph (see `is_rank_weight`).
    """
    table: dict[str, dict[str, Any]] = {}
    external: dict[str, ir.ExternalTensor] = {}
    with open(path, "wb") as f:
        for model in models:
            for value in model.graph.initializers.values():
                tensor = value.const_value
                weight = tensor.dtype.is_floating_point() or tensor.dtype in QUANTIZED_DTYPES
                if not weight or not is_rank_weight(value.name, model_tensors):
                    continue  # graph constants stay in the graph, where shape inference reads them
                if value.name in external:
                    known = table[value.name]
                    if known["dtype"] != tensor.dtype.name or known["shape"] != list(tensor.shape):
                        from glmc.graphs.trace import ExportError

                        raise ExportError(f"graphs of one rank disagree on weight {value.name}")
                    value.const_value = external[value.name]
                    continue
                offset = -f.tell() % ALIGNMENT + f.tell()
                f.seek(offset)
                # Written block by block from views of the source: no whole-tensor copies.
                if hasattr(tensor, "chunks"):
                    blocks = tensor.chunks()
                elif tensor.dtype == ir.DataType.INT4:
                    blocks = [np.frombuffer(tensor.tobytes(), dtype=np.uint8)]  # packed, as ONNX stores it
                else:
                    blocks = [tensor.numpy()]
                for block in blocks:
                    f.write(memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8)))
                length = f.tell() - offset
                table[value.name] = {"offset": offset, "length": length, "dtype": tensor.dtype.name,
                                     "shape": [int(d) for d in tensor.shape]}
                external[value.name] = ir.ExternalTensor(
                    path.name, offset, length, tensor.dtype, shape=ir.Shape(tensor.shape), name=value.name,
                    base_dir=str(path.parent))
                value.const_value = external[value.name]
    return table


# How the graphs may store a parameter, as initializer-name suffixes (see passes/prepack_weights,
# passes/attention_3d and passes/weight_only_matmul), outermost last: ".T" transposed, ".qkv" QKV
# columns grouped, ".nbits" / ".dq" quantized codes and scales in MatMulNBits' / DequantizeLinear's layout.
STORAGE_FORMS = (("",), (TRANSPOSED,), (GROUPED,), (TRANSPOSED, GROUPED), (NBITS,), (DEQUANTIZE,),
                 (GROUPED, NBITS), (GROUPED, DEQUANTIZE))
TRANSFORM_NAMES = {TRANSPOSED: "transpose", GROUPED: "group_qkv", NBITS: "matmul_nbits",
                   DEQUANTIZE: "dequantize_linear"}


def weight_map(state_names: list[str], table: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Reference-model parameter -> the initializer that stores it and the transforms applied,
    and under "also" any further storage form of it (the ONNX Runtime target keeps the tied
    embedding as rows and transposed)."""
    out = {}
    for name in state_names:
        forms = [{"initializer": name + "".join(suffixes),
                  "transforms": [TRANSFORM_NAMES[s] for s in suffixes if s]}
                 for suffixes in STORAGE_FORMS if name + "".join(suffixes) in table]
        if not forms:
            from glmc.graphs.trace import ExportError

            raise ExportError(f"parameter {name} is stored in no graph of the rank")
        out[name] = dict(forms[0], also=forms[1:]) if len(forms) > 1 else forms[0]
    return out


Progress = Callable[[str], None]


def write_package(
    ckpt,
    out_dir: Path,
    *,
    tp_size: int = 1,
    dtype: str | None = None,
    target: str = "onnxruntime",
    tokenizer: dict[str, Any] | None = None,
    tokenizer_file: Path | None = None,
    special_tokens: dict[str, int] | None = None,
    quantization_bits: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Export `ckpt` (a SatCheckpoint) rank by rank: trace, optimise, write graphs and weights.

    `quantization_bits` (8 or 4) quantizes a float checkpoint's four matrices per layer as
    GLM-130B does; a quantized checkpoint is exported with its own codes and scales as they are."""
    from glmc.checkpoint.convert import check_quantized_split
    from glmc.passes import target_named

    target_spec = target_named(target)
    dtype = dtype or str(ckpt.info.float_dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise PackageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    stored_bits = ckpt.info.quantization_bits
    if quantization_bits is not None:
        try:
            check_bits(quantization_bits, "--quantization-bit-width")
        except ValueError as error:
            raise PackageError(str(error)) from None
        if stored_bits is not None and stored_bits != quantization_bits:
            raise PackageError(f"{ckpt.root}: already quantized to int{stored_bits}; --quantization-bit-width "
                               f"{quantization_bits} would quantize its codes again (export the unquantized "
                               "checkpoint instead)")
    bits = stored_bits if stored_bits is not None else quantization_bits
    config: GLMConfig = ckpt.config
    config.check_mapping(Mapping(tp_size, 0))
    if bits is not None:
        check_quantized_split(ckpt, tp_size, bits)  # int4 widths, exact resharding: before any work
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite) as tmp:
        ranks, passes, declined = [], {}, {}
        for rank in range(tp_size):
            entry, rank_passes, rank_declined = _write_rank(ckpt, Mapping(tp_size, rank), DTYPES[dtype],
                                                            target_spec, tmp, progress, bits)
            ranks.append(entry)
            if rank == 0:  # every rank's graphs have the same structure; rank 0's counts stand for all
                passes, declined = rank_passes, rank_declined
            gc.collect()  # the exporter's objects hold the rank's weights in reference cycles
        # The cache is written in place only where the pass rewrote every attention (it is all or none).
        target = dict(target_spec.to_dict(), static_kv_cache=bool(passes["step"].get("static_kv_cache")))
        tokenizer_entry = None
        if tokenizer_file is not None:
            (tmp / "tokenizer").mkdir()
            shutil.copyfile(tokenizer_file, tmp / "tokenizer" / "ice_text.model")
            tokenizer_entry = dict(tokenizer or {}, model="tokenizer/ice_text.model")
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[str(path.relative_to(tmp))] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "glmc_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_dict(), "tp_size": tp_size, "dtype": dtype, "target": target,
            "logits": "vocab-parallel: rank r returns vocabulary rows [r * V / tp, (r + 1) * V / tp)",
            "tokenizer": tokenizer_entry, "special_tokens": special_tokens,
            "source": {"checkpoint": str(Path(ckpt.root).resolve()), "iteration": ckpt.iteration,
                       "tp_size": ckpt.tp_size, "dtype": str(ckpt.info.float_dtype).removeprefix("torch.")},
            "quantization": None if bits is None else {
                "bits": bits, "block_size": BLOCK_SIZE,  # the largest; see glmc.quantization.block_size_for
                "scheme": "GLM-130B weight-only: symmetric codes, one fp16 absmax scale per output row",
                "codes_from": "checkpoint" if stored_bits is not None else "export"},
            "passes": passes, "declined": declined, "ranks": ranks, "files": files,
        }
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return out_dir


def _write_rank(ckpt, mapping: Mapping, dtype: torch.dtype, target, tmp: Path, progress: Progress | None,
                bits: int | None = None):
    """Trace, optimise and write one rank; nothing of it stays referenced once this returns."""
    from glmc.checkpoint import load_model
    from glmc.graphs.trace import export_graph
    from glmc.passes import optimize

    rank = mapping.rank
    model = load_model(ckpt, mapping, dtype=dtype, quantization_bits=bits)
    graphs, passes, declined = {}, {}, {}
    for kind in GRAPHS:
        if progress:
            progress(f"rank {rank}: tracing {kind}")
        graphs[kind] = export_graph(model, kind)
        if progress:
            progress(f"rank {rank}: optimising {kind}")
        _, passes[kind], declined[kind] = optimize(graphs[kind], target)
    rank_dir = tmp / _rank_dir(rank)
    rank_dir.mkdir()
    if progress:
        progress(f"rank {rank}: writing weights")
    model_tensors = set(model.state_dict()) | {name for name, _ in model.named_buffers()}
    table = write_weights(list(graphs.values()), rank_dir / WEIGHTS, model_tensors)
    for kind, graph in graphs.items():
        ir.save(graph, rank_dir / f"{kind}.onnx")
    entry = {
        "rank": rank,
        "graphs": {kind: f"{_rank_dir(rank)}/{kind}.onnx" for kind in GRAPHS},
        "graph_weights": {kind: sorted(n for n in graph.graph.initializers if n in table)
                          for kind, graph in graphs.items()},
        "weights": f"{_rank_dir(rank)}/{WEIGHTS}",
        "tensors": table,
        "parameters": weight_map(sorted(model.state_dict().keys() - {"rotary_cos", "rotary_sin"}), table),
    }
    return entry, passes, declined


@dataclass(frozen=True)
class Package:
    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, verify: str = "sizes") -> "Package":
        """Open a package and check that it is sealed (see `glmc.graphs.seal`).

        `verify` "sizes": the sizes of all files and the digests of all but the weight
        files; "full": the digests of every file, weights included (reads every byte)."""
        if verify not in ("sizes", "full"):
            raise ValueError(f"verify must be 'sizes' or 'full', not {verify!r}")
        root = Path(path)
        if not root.is_dir():
            raise PackageError(f"{root}: no such package directory")
        manifest_path = root / MANIFEST
        if manifest_path.is_symlink():
            raise PackageError(f"{manifest_path}: a symbolic link; a package holds only its own files")
        if not manifest_path.is_file():
            raise PackageError(f"{root}: not a glmc package (no {MANIFEST}; was the export interrupted?)")
        manifest = read_json(manifest_path, PackageError, max_bytes=MAX_MANIFEST_BYTES)
        check_manifest(manifest_path, manifest)
        check_files(root, manifest, full=verify == "full")
        for entry in manifest["ranks"]:
            for kind in GRAPHS:
                check_graph(root, entry, kind)
        return cls(root, manifest)

    @property
    def config(self) -> GLMConfig:
        return GLMConfig.from_dict(self.manifest["config"])

    @property
    def tp_size(self) -> int:
        return int(self.manifest["tp_size"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    @property
    def static_kv_cache(self) -> bool:
        """Whether the graphs write the KV cache in place (buffers bound as past and present)."""
        return bool(self.manifest["target"].get("static_kv_cache"))

    @property
    def quantization_bits(self) -> int | None:
        """8 or 4 for a package of GLM-130B's weight-only quantized matrices, else None."""
        quantization = self.manifest.get("quantization")
        return None if quantization is None else int(quantization["bits"])

    def graph_path(self, rank: int, kind: str) -> Path:
        return self.root / self.manifest["ranks"][rank]["graphs"][kind]

    def graph_weights(self, rank: int, kind: str) -> list[str]:
        """Names of the weights (in the rank's weights file) that graph `kind` reads."""
        return self.manifest["ranks"][rank]["graph_weights"][kind]

    def weights_path(self, rank: int) -> Path:
        return self.root / self.manifest["ranks"][rank]["weights"]

    def tensor(self, rank: int, name: str, mmap: np.memmap | None = None) -> np.ndarray:
        """One initializer of `rank`, read from its weights file (a read-only view when memory-mapped)."""
        entry = self.manifest["ranks"][rank]["tensors"][name]
        data = mmap if mmap is not None else np.memmap(self.weights_path(rank), dtype=np.uint8, mode="r")
        offset, length = entry["offset"], entry["length"]
        # Checked at open; checked again here, since the file may have changed since (a slice past
        # the end would silently come back short, a negative offset count from the end).
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset <= offset + length <= data.size):
            raise PackageError(f"{self.weights_path(rank)}: tensor {name} (bytes {offset} to {offset + length}) "
                               f"lies outside the file ({data.size} bytes)")
        raw = data[offset: offset + length]
        if entry["dtype"] == "INT4":  # numpy has no packed 4-bit type: the bytes, two codes each
            return raw.reshape(*entry["shape"][:-1], -1)
        return raw.view(ir.DataType[entry["dtype"]].numpy()).reshape(entry["shape"])

    def state_dict(self, rank: int) -> dict[str, torch.Tensor]:
        """The reference model's parameters of `rank`, as the graphs store them, un-transposed; a
        quantized package's codes and scales come back in GLM-130B's layout, bit for bit."""
        from glmc.checkpoint.layout import expected_parameters
        from glmc.passes.attention_3d import ungroup_columns, ungroup_rows

        data = np.memmap(self.weights_path(rank), dtype=np.uint8, mode="r")
        state = {}
        heads = self.config.num_attention_heads // self.tp_size
        bits = self.quantization_bits
        expected = expected_parameters(self.config, Mapping(self.tp_size, rank), bits)
        for name, entry in self.manifest["ranks"][rank]["parameters"].items():
            array = self.tensor(rank, entry["initializer"], data)
            for transform in reversed(entry["transforms"]):
                if transform == "group_qkv" and expected[name].kind != "float" and array.ndim == 2:
                    array = ungroup_rows(array, heads)  # quantized codes: one row per output
                elif transform == "group_qkv":
                    array = ungroup_columns(array, heads)
                elif transform == "transpose":
                    array = array.T
                else:
                    array = _glm_layout(array, transform, name, bits, expected[name].shape)
            state[name] = _torch_tensor(np.array(array, order="C"))  # a copy, row-major like the model's own
        return state


def _glm_layout(array: np.ndarray, transform: str, name: str, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """A quantized parameter as GLM-130B stores it: int8 codes [N, K * bits / 8], fp16 scales [N]."""
    scale = name.endswith("_scale")
    if transform == "matmul_nbits":
        if scale:
            return from_block_scales(array, shape[0])
        return from_matmul_nbits_layout(array, bits, shape[1] * 8 // bits)
    if scale:
        return from_dequantize_linear_scales(array, bits)
    return from_dequantize_linear_layout(array, bits)


def _torch_tensor(array: np.ndarray) -> torch.Tensor:
    # numpy has no bfloat16 of its own (onnx-ir reads it as ml_dtypes'), which torch does not take:
    # go through its bits.
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
