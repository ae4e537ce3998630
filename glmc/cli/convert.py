"""`glmc convert`: GLM-130B's tools/convert_tp.py, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import click

from glmc.cli import cli


@cli.command(context_settings={"show_default": True})
@click.argument("checkpoint", type=click.Path(file_okay=False, path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--target-tp", type=click.IntRange(min=1), required=True,
              help="Tensor-parallel degree of the output (any degree that divides heads, GeGLU width "
                   "and vocabulary).")
@click.option("--quantization-bit-width", type=click.Choice(["4", "8"]),
              help="Store the four big matrices of each layer as int8 or packed int4 with per-row fp16 "
                   "scales, as GLM-130B's quantized checkpoints.")
@click.option("--config", "config_name", metavar="NAME",
              help="Model preset for a checkpoint without model_config.json.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new one is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (paths, sizes, peak memory).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar on stderr.")
def convert(checkpoint, output, target_tp, quantization_bit_width, config_name, force, as_json, progress):
    """Write CHECKPOINT at another tensor-parallel degree (and optionally quantized) to OUTPUT.

    Unlike GLM-130B's tools/convert_tp.py, which holds the whole model in memory,
    a target rank is assembled one layer at a time from memory-mapped source
    shards: peak memory stays near one target rank. OUTPUT appears only once
    complete.

    \b
    Example:
      glmc convert glm-130b-sat glm-130b-tp4-int4 --target-tp 4 --quantization-bit-width 4
    """
    from tqdm import tqdm

    from glmc.checkpoint import SatCheckpoint, convert_checkpoint
    from glmc.checkpoint.convert import progress_steps
    from glmc.config import from_name
    from glmc.memory import peak_rss_bytes

    ckpt = SatCheckpoint.open(checkpoint, from_name(config_name) if config_name else None)
    bits = int(quantization_bit_width) if quantization_bit_width else None
    bar = tqdm(total=progress_steps(ckpt, target_tp), unit="layer", disable=not progress,
               desc=f"TP {ckpt.tp_size} -> {target_tp}")
    with bar:
        convert_checkpoint(ckpt, output, target_tp, quantization_bits=bits, overwrite=force,
                           progress=lambda _: bar.update())
    shards = sorted((output / ckpt.iteration).glob("mp_rank_*_model_states.pt"))
    summary = {
        "input": str(checkpoint), "output": str(output), "iteration": ckpt.iteration,
        "source_tp": ckpt.tp_size, "target_tp": target_tp, "quantization_bits": bits,
        "shard_bytes": [s.stat().st_size for s in shards],
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        total = sum(summary["shard_bytes"])
        click.echo(f"wrote {output}: {len(shards)} shards, {total / 2**20:.1f} MiB, "
                   f"peak memory {summary['peak_rss_bytes'] / 2**20:.0f} MiB")
