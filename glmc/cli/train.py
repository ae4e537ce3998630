"""`glmc train`: pre-train a GLM with GLM-130B's blank-infilling objective."""

from __future__ import annotations

import json
from pathlib import Path

import click

from glmc.cli import cli
from glmc.cli.types import SEED, finite


@cli.command(context_settings={"show_default": True})
@click.option("--config", "config_name", default="glm-demo", metavar="NAME",
              help="Model preset (glm-demo, glm-tiny, glm-bench, glm-130b).")
@click.option("--data", type=click.Path(dir_okay=False, exists=False, path_type=Path), multiple=True,
              required=True, help="Corpus file (repeatable): records separated by lines holding only '%', or "
                                  "paragraphs separated by blank lines. Every 20th record is held out.")
@click.option("--tokenizer", type=click.Path(dir_okay=False, path_type=Path),
              help="SentencePiece model in icetk's layout. Default: the embedded model's.", show_default=False)
@click.option("--steps", type=click.IntRange(min=1), required=True, help="Optimizer steps in all (resumed runs included).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, help="Samples per step.")
@click.option("--seq-len", type=click.IntRange(min=16), default=256, help="Tokens per sample, blanks included.")
@click.option("--lr", type=finite(0, min_open=True), default=1e-3, help="Peak learning rate (AdamW, warmup then cosine decay).")
@click.option("--warmup-steps", type=click.IntRange(min=1), help="Default: 2% of the steps.", show_default=False)
@click.option("--embedding-grad-scale", type=finite(0, 1), default=0.1,
              help="GLM-130B's embedding gradient shrink: 0 freezes the embedding, 1 leaves its gradient whole.")
@click.option("--seed", type=SEED, default=1234, help="Seed of the initialisation and of the data order.")
@click.option("--save-interval", type=click.IntRange(min=0), default=0,
              help="Steps between checkpoints (0: only at the end).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="SAT checkpoint folder to write (and to resume from); made at the first save.")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out.")
@click.option("--device", default="auto", help="cpu, cuda, or auto (CUDA when present).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar with loss and tokens/s.")
def train(config_name, data, tokenizer, steps, batch_size, seq_len, lr, warmup_steps, embedding_grad_scale, seed,
          save_interval, out, resume, device, as_json, progress):
    """Pre-train a GLM on text with GLM-130B's objective into a SAT checkpoint.

    Autoregressive blank infilling: [MASK] samples (30%) with Poisson(3) spans
    covering 15% of the tokens, [gMASK] samples (70%) continuing a prefix; the
    corrupted context attends bidirectionally, the blanks autoregressively, with the
    1-D positions `glmc run` uses. DeepNorm initialisation, embedding gradient
    shrink, FP32 softmax, gradient clipping, AdamW with warmup and cosine decay,
    bf16 autocast on GPUs. Checkpoints are written atomically; --resume continues a
    stopped run exactly.

    \b
    Example (the embedded default model):
      glmc train --config glm-demo --data data/corpus/en.txt --data data/corpus/zh.txt \\
          --steps 4500 --batch-size 16 --seq-len 256 --lr 1e-3 --warmup-steps 100 \\
          --save-interval 250 --out demo-ckpt --json
    """
    import torch
    from tqdm import tqdm

    from glmc.api import EMBEDDED_DEFAULT
    from glmc.config import from_name
    from glmc.tokenizer import IceTokenizer
    from glmc.train import TrainOptions
    from glmc.train import train as run_training

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = from_name(config_name)
    tok = IceTokenizer(tokenizer or EMBEDDED_DEFAULT / "ice_text.model", text_offset=0)
    options = TrainOptions(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps,
                           embedding_grad_scale=embedding_grad_scale, seed=seed, save_interval=save_interval)
    bar = tqdm(total=steps, disable=not progress, unit="step", desc="train")

    def report(step: int, loss: float, tokens_per_second: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_second:.0f}", refresh=False)
        bar.refresh()

    with bar:
        result = run_training(config, tok, list(data), out, options, resume=resume, device=device, progress=report)
    summary = {"out": str(out), "steps": result.step, "final_loss": result.losses[-1],
               "heldout_loss": result.heldout_loss, "tokens_per_second": result.tokens_per_second,
               "seconds": result.seconds, "device": device}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"wrote {out}: {result.step} steps, last loss {result.losses[-1]:.3f}, held-out loss "
                   f"{result.heldout_loss:.3f}, {result.tokens_per_second:.0f} tokens/s")
