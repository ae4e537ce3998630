"""`glmc inspect`: validate a SAT checkpoint and describe it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from glmc.cli import cli


@cli.command()
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("--config", "config_name", metavar="NAME",
              help="Model preset for a checkpoint without model_config.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect(checkpoint, config_name, as_json):
    """Check every shard of CHECKPOINT (keys, shapes, dtypes, one TP layout) and describe it."""
    from glmc.checkpoint import SatCheckpoint
    from glmc.config import from_name

    ckpt = SatCheckpoint.open(checkpoint, from_name(config_name) if config_name else None)
    shards = [ckpt.shard_path(r) for r in range(ckpt.tp_size)]
    info = {
        "path": str(ckpt.root), "iteration": ckpt.iteration, "tp_size": ckpt.tp_size,
        "dtype": str(ckpt.info.float_dtype).removeprefix("torch."),
        "quantization_bits": ckpt.info.quantization_bits, "config": ckpt.config.to_dict(),
        "parameters": ckpt.config.parameter_count(),
        "shards": [{"file": str(s), "bytes": s.stat().st_size} for s in shards],
        "glmc": ckpt.metadata,
    }
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False))
        return
    c = ckpt.config
    click.echo(f"{ckpt.root}: valid SAT checkpoint, iteration {ckpt.iteration}")
    click.echo(f"  model   {c.num_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
               f"GeGLU {c.inner_hidden_size}, vocab {c.vocab_size}, max length {c.max_sequence_length}")
    click.echo(f"  weights {info['parameters']:,} parameters, {ckpt.info.describe()}, TP {ckpt.tp_size}")
    for shard in info["shards"]:
        click.echo(f"  {shard['file']}  {shard['bytes'] / 2**20:.1f} MiB")
