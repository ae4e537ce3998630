"""`glmc inspect`: validate a SAT checkpoint or a compiled package and describe it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from glmc.cli import cli
from glmc.errors import GlmcError

FUSED_OPS = ("Attention", "GroupQueryAttention", "RotaryEmbedding", "GeGLU", "AllReduce")


@cli.command()
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", "config_name", metavar="NAME",
              help="Model preset for a checkpoint without model_config.json.")
@click.option("--verify", is_flag=True,
              help="Also check every byte: a checkpoint's zip records against their CRC-32 and its weights "
                   "for NaN and infinity (one shard at a time, streamed); a package's files against their "
                   "sha256.")
@click.option("--verify-weights", "verify_weights", is_flag=True, hidden=True)  # the earlier name of --verify
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.option("--progress/--no-progress", default=True, help="With --verify, a line on stderr per shard.")
def inspect(path, config_name, verify, verify_weights, as_json, progress):
    """Check PATH and describe it.

    A SAT checkpoint: every shard's keys, shapes and dtypes, one TP layout. A
    package: every file against the manifest, then per graph the op histogram,
    the fused-op counts, the softmax precisions and the weight bytes. With
    --verify, weights that are NaN or infinite are reported (the first tensor and
    its count) and the command exits with status 1 after the description.
    """
    from glmc.sources import is_package

    verify = verify or verify_weights
    if is_package(path):
        info = _package(path, verify)
    else:
        info = _checkpoint(path, config_name, verify, progress)
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False))
    else:
        click.echo(_text(info))
    problem = _non_finite_problem(info)
    if problem:
        raise GlmcError(problem)


def _checkpoint(path: Path, config_name: str | None, verify: bool, progress: bool) -> dict:
    from glmc.checkpoint import SatCheckpoint
    from glmc.checkpoint.verify import verify_shard
    from glmc.config import from_name

    ckpt = SatCheckpoint.open(path, from_name(config_name) if config_name else None)
    shards = ckpt.shard_paths()
    info = {
        "kind": "checkpoint", "path": str(ckpt.root), "iteration": ckpt.iteration, "tp_size": ckpt.tp_size,
        "dtype": str(ckpt.info.float_dtype).removeprefix("torch."),
        "quantization_bits": ckpt.info.quantization_bits, "config": ckpt.config.to_dict(),
        "parameters": ckpt.config.parameter_count(),
        "bits_per_weight": _checkpoint_bits(ckpt),
        "shards": [{"file": str(s), "bytes": s.stat().st_size} for s in shards],
        "glmc": ckpt.metadata,
    }
    if verify:
        for number, (shard, entry) in enumerate(zip(shards, info["shards"]), 1):
            if progress:
                click.echo(f"glmc: verifying {shard} ({number}/{len(shards)}, {entry['bytes'] / 2**20:,.1f} MiB)",
                           err=True)
            entry["verify"] = verify_shard(shard).to_dict()
    return info


def _checkpoint_bits(ckpt) -> dict:
    """Bits per weight of the checkpoint's tensors as stored (codes and scales for quantized matrices)."""
    from glmc.checkpoint.layout import QUANTIZED, base_name, expected_parameters
    from glmc.config import Mapping

    float_bits = torch_bits(ckpt.info.float_dtype)
    counts = {"quantized": [0, 0], "float": [0, 0]}  # weights, bits
    for rank in range(ckpt.tp_size):
        expected = expected_parameters(ckpt.config, Mapping(ckpt.tp_size, rank), ckpt.info.quantization_bits)
        for name, want in expected.items():
            size = 1
            for dim in want.shape:
                size *= dim
            if want.kind == "float":
                counts["float"][0] += size
                counts["float"][1] += size * float_bits
            elif want.kind == "int8":
                counts["quantized"][0] += size * 8 // ckpt.info.quantization_bits
                counts["quantized"][1] += size * 8
            else:
                counts["quantized"][1] += size * 16
    return _bits_summary(counts, f"{str(ckpt.info.float_dtype).removeprefix('torch.')}")


def torch_bits(dtype) -> int:
    return dtype.itemsize * 8


def _package_bits(package) -> dict:
    """Bits per weight of a package's stored tensors: the quantized matrices (codes and their scales,
    as stored for their op) and the weights that stay float, over every rank."""
    from glmc.checkpoint.layout import expected_parameters
    from glmc.config import Mapping
    from glmc.graphs.seal import ITEM_BYTES

    counts = {"quantized": [0, 0], "float": [0, 0]}
    bits = package.quantization_bits
    for rank, entry in enumerate(package.manifest["ranks"]):
        dense = expected_parameters(package.config, Mapping(package.tp_size, rank))
        for name, stored in entry["parameters"].items():
            tensor = entry["tensors"][stored["initializer"]]
            size = 1
            for dim in tensor["shape"]:
                size *= dim
            stored_bits = round(size * ITEM_BYTES[tensor["dtype"]] * 8)
            matrix = name[: -len("_scale")] if name.endswith("_scale") else name
            kind = "quantized" if bits and matrix + "_scale" in entry["parameters"] else "float"
            if not name.endswith("_scale"):
                weights = 1
                for dim in dense[name].shape:
                    weights *= dim
                counts[kind][0] += weights
            counts[kind][1] += stored_bits
    return _bits_summary(counts, package.dtype)


def _bits_summary(counts: dict, float_dtype: str) -> dict:
    total_weights = counts["quantized"][0] + counts["float"][0]
    total_bits = counts["quantized"][1] + counts["float"][1]
    return {
        "overall": total_bits / total_weights if total_weights else 0.0,
        "quantized_matrices": counts["quantized"][1] / counts["quantized"][0] if counts["quantized"][0] else None,
        "quantized_weights": counts["quantized"][0],
        "float": counts["float"][1] / counts["float"][0] if counts["float"][0] else None,
        "float_weights": counts["float"][0],
        "float_dtype": float_dtype,
    }


def _bits_text(bits: dict) -> str:
    if bits["quantized_matrices"] is None:
        return f"{bits['overall']:.2f} bits per weight ({bits['float_dtype']})"
    return (f"{bits['overall']:.2f} bits per weight: {bits['quantized_matrices']:.2f} in the quantized matrices "
            f"({bits['quantized_weights']:,} weights, codes and scales), {bits['float']:.0f} in the "
            f"{bits['float_weights']:,} that stay {bits['float_dtype']} (embedding, LayerNorms, biases)")


def _non_finite_problem(info: dict) -> str | None:
    """The one-line error for NaN or infinite weights found by --verify, if any."""
    found = [(s["file"], bad) for s in info.get("shards", []) for bad in s.get("verify", {}).get("non_finite", [])]
    if not found:
        return None
    file, first = found[0]
    more = f"; {len(found)} tensors in all" if len(found) > 1 else ""
    return f"{file}: {first['name']} holds {first['count']:,} NaN or infinite values{more}"


def _verification(v: dict) -> str:
    if v["records"] is None:
        crc = "no zip records (a legacy shard: no CRC to check)"
    else:
        crc = f"{v['records']} zip records match their CRC-32"
        if v["records_without_crc"]:
            crc += f", {v['records_without_crc']} written without one"
    if v["non_finite"]:
        first = v["non_finite"][0]
        weights = (f"NaN or infinite values in {len(v['non_finite'])} of {v['tensors']} tensors, first "
                   f"{first['name']} ({first['count']:,})")
    else:
        weights = f"{v['tensors']} weight tensors finite"
    return f"{crc}; {weights}"


def graph_summary(path: Path) -> dict:
    """Op histogram, fused-op counts and softmax precisions of one graph file."""
    import onnx_ir as ir

    from glmc.passes.fp32_softmax import softmax_dtypes

    model = ir.load(path)
    ops = Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph.all_nodes())
    return {
        "ops": dict(sorted(ops.items())),
        "fused": {op: sum(c for name, c in ops.items() if name.split(".")[-1] == op) for op in FUSED_OPS},
        "softmax": dict(Counter(softmax_dtypes(model))),
        "nodes": sum(ops.values()),
    }


def _package(path: Path, verify: bool) -> dict:
    from glmc.graphs import Package

    package = Package.open(path, verify="full" if verify else "sizes")
    ranks = []
    for rank, entry in enumerate(package.manifest["ranks"]):
        ranks.append({
            "rank": rank,
            "weight_bytes": package.weights_path(rank).stat().st_size,
            "graphs": {kind: graph_summary(package.graph_path(rank, kind)) for kind in entry["graphs"]},
        })
    manifest = package.manifest
    return {"kind": "package", "path": str(package.root), "tp_size": package.tp_size, "dtype": package.dtype,
            "quantization": manifest.get("quantization"), "bits_per_weight": _package_bits(package),
            "target": package.target, "config": manifest["config"], "source": manifest["source"],
            "passes": manifest["passes"], "ranks": ranks, "glmc_version": manifest["glmc_version"],
            "verified": "sha256 of every file" if verify else "sizes of every file, sha256 of the graphs"}


def _text(info: dict) -> str:
    c = info["config"]
    model = (f"{c['num_layers']} layers, hidden {c['hidden_size']}, {c['num_attention_heads']} heads, "
             f"GeGLU {c['inner_hidden_size']}, vocab {c['vocab_size']}, max length {c['max_sequence_length']}")
    if info["kind"] == "checkpoint":
        bits = f"int{info['quantization_bits']} weights" if info["quantization_bits"] else "no quantization"
        lines = [f"{info['path']}: valid SAT checkpoint, iteration {info['iteration']}",
                 f"  model   {model}",
                 f"  weights {info['parameters']:,} parameters, {info['dtype']}, {bits}, TP {info['tp_size']}",
                 f"          {_bits_text(info['bits_per_weight'])}"]
        for s in info["shards"]:
            lines.append(f"  {s['file']}  {s['bytes'] / 2**20:.1f} MiB")
            if "verify" in s:
                lines.append(f"    verified: {_verification(s['verify'])}")
        return "\n".join(lines)
    lines = [f"{info['path']}: valid glmc package (glmc {info['glmc_version']}), TP {info['tp_size']}, "
             f"{info['dtype']}, target {info['target']}",
             f"  model   {model}",
             f"  source  {info['source']['checkpoint']} (iteration {info['source']['iteration']}, "
             f"TP {info['source']['tp_size']})",
             f"  weights {_bits_text(info['bits_per_weight'])}",
             f"  checked {info['verified']}"]
    for rank in info["ranks"]:
        lines.append(f"  rank {rank['rank']}: weights {rank['weight_bytes'] / 2**20:.1f} MiB")
        for kind, graph in rank["graphs"].items():
            fused = ", ".join(f"{op} {n}" for op, n in graph["fused"].items() if n)
            softmax = ", ".join(f"{k} x{v}" for k, v in graph["softmax"].items())
            lines.append(f"    {kind}: {graph['nodes']} nodes; fused: {fused or 'none'}; softmax: {softmax}")
            lines.append("      " + " ".join(f"{op}:{n}" for op, n in graph["ops"].items()))
    return "\n".join(lines)
