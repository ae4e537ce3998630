"""`glmc export`: compile a SAT checkpoint into a package of optimised per-rank graphs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from glmc.cli import cli


@cli.command(context_settings={"show_default": True})
@click.argument("checkpoint", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Package directory to write.")
@click.option("--tp", "tp_size", type=click.IntRange(min=1), default=1,
              help="Tensor-parallel degree of the package (any source TP is resharded on the way).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Dtype of the graphs. Default: the checkpoint's own. ONNX Runtime on CPU needs float32.",
              show_default=False)
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt", "unfused"]), default="onnxruntime",
              help="Backend the passes optimise for: onnxruntime (fused Attention, RotaryEmbedding, GeGLU), "
                   "tensorrt (primitives TensorRT fuses itself, no com.microsoft ops), unfused (baseline).")
@click.option("--quantization-bit-width", type=click.Choice(["4", "8"]),
              help="Quantize each layer's four matrices to int8 or int4 as GLM-130B does (per-row fp16 "
                   "scales); the package stores codes and scales. A quantized checkpoint keeps its own.")
@click.option("--config", "config_name", metavar="NAME", help="Model preset for a checkpoint without model_config.json.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path),
              help="icetk's ice_text.model to ship in the package. Default: the checkpoint's own.")
@click.option("--tokenizer-variant", type=click.Choice(["icetk", "sat-0.3"]), help="See `glmc run --help`.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new package is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (pass counts, files, peak memory).")
@click.option("--progress/--no-progress", default=True, help="Show progress on stderr.")
def export(checkpoint, output, tp_size, dtype, target, quantization_bit_width, config_name, tokenizer,
           tokenizer_variant, force, as_json, progress):
    """Compile CHECKPOINT (default: the embedded model) into a package for `glmc run --package`.

    Each rank of the reference model is traced with torch.onnx (dynamo, opset 23)
    into a prefill and a decode graph with dynamic batch and sequence axes;
    tensor-parallel ranks carry glmc.AllReduce nodes after their row-parallel
    matmuls. The passes then fuse attention, rotary and GeGLU for the target and
    keep every softmax in FP32. A rank's weights are written once, shared by its
    graphs. Ranks are processed one at a time: peak memory stays near one rank.
    The package appears only once complete, with a manifest of every file's size
    and sha256.

    With --quantization-bit-width (or from a quantized checkpoint) the four matrices
    of each layer stay int8 / int4: com.microsoft.MatMulNBits for ONNX Runtime,
    DequantizeLinear feeding MatMul for the tensorrt and unfused targets.

    \b
    Example:
      glmc export glm-130b-sat -o glm-130b-ort --tp 8 --dtype float16
      glmc export glm-130b-sat -o glm-130b-int4 --tp 4 --dtype float16 --quantization-bit-width 4
    """
    from glmc.api import export as export_package
    from glmc.graphs import Package
    from glmc.memory import peak_rss_bytes

    def report(message: str) -> None:
        if progress:
            click.echo(f"[export] {message}", err=True)

    bits = int(quantization_bit_width) if quantization_bit_width else None
    path = export_package(checkpoint, output, tp_size=tp_size, dtype=dtype, target=target, config=config_name,
                          tokenizer=tokenizer, tokenizer_variant=tokenizer_variant, quantization_bits=bits,
                          overwrite=force, progress=report)
    package = Package.open(path)
    summary = {"package": str(path), "tp_size": package.tp_size, "dtype": package.dtype, "target": package.target,
               "quantization_bits": package.quantization_bits,
               "passes": package.manifest["passes"], "declined": package.manifest["declined"],
               "files": package.manifest["files"], "peak_rss_bytes": peak_rss_bytes()}
    if as_json:
        click.echo(json.dumps(summary))
        return
    quantized = f", int{package.quantization_bits} weights" if package.quantization_bits else ""
    click.echo(f"wrote {path}: TP {package.tp_size}, {package.dtype}{quantized}, target {package.target}")
    for graph, counts in summary["passes"].items():
        click.echo(f"  {graph}: " + ", ".join(f"{name} {count}" for name, count in counts.items()))
    total = sum(f["bytes"] for f in summary["files"].values())
    click.echo(f"  {len(summary['files'])} files, {total / 2**20:.1f} MiB; peak memory {summary['peak_rss_bytes'] / 2**20:.0f} MiB")
