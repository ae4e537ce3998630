"""Pre-training a GLM with GLM-130B's objective and stability tricks.

DeepNorm (alpha = sqrt(2N) residuals, Xavier-normal weights scaled by (2N)^-1/2
for the FFN, the value projection and the output projection), the embedding
gradient shrink (x0.1), the FP32 softmax (in the model), gradient clipping,
AdamW with linear warmup and cosine decay, bf16 autocast on GPUs that have it.
Checkpoints are SAT checkpoints plus the optimizer and data-sampler state, written
atomically, so a run stopped and resumed gives the losses an uninterrupted run does.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from glmc.checkpoint import SatCheckpoint
from glmc.checkpoint.sat import CONFIG_FILE, config_to_sat_args, save_shard, shard_name
from glmc.config import GLMConfig
from glmc.errors import GlmcError
from glmc.fileio import write_text_atomic
from glmc.model import GLMModel
from glmc.tokenizer import IceTokenizer
from glmc.train.data import Corpus, WindowSampler, heldout_windows
from glmc.train.objective import IGNORE, collate, make_sample, window_length

STATE_FILE = "glmc_train_state.pt"
TOKENIZER_FILE = "ice_text.model"


@dataclass(frozen=True)
class TrainOptions:
    steps: int
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    warmup_steps: int | None = None  # default: 2% of the steps
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    embedding_grad_scale: float = 0.1  # GLM-130B's embedding gradient shrink
    seed: int = 1234
    save_interval: int = 0  # steps between checkpoints (0: only at the end)
    heldout_batches: int = 8


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # training loss of every step, from step 1
    heldout_loss: float | None = None
    tokens_per_second: float = 0.0
    seconds: float = 0.0


@torch.no_grad()
def deepnorm_init_(model: GLMModel, seed: int) -> GLMModel:
    """GLM-130B's DeepNorm initialisation (a generator seeded with `seed`, parameters in order)."""
    generator = torch.Generator().manual_seed(seed)
    beta = (2 * model.config.num_layers) ** -0.5
    hd = model.config.head_dim
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        elif name == "word_embeddings.weight":
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        else:
            fan_out, fan_in = param.shape
            std = math.sqrt(2.0 / (fan_in + fan_out))  # Xavier normal
            value = torch.randn(param.shape, generator=generator) * std
            if "dense" in name:  # attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h
                value *= beta
            elif "query_key_value" in name:  # scale the value rows of each head (head-major q, k, v)
                heads = value.view(-1, 3, hd, fan_in)
                heads[:, 2] *= beta
            param.copy_(value)
    return model


def learning_rate(step: int, options: TrainOptions) -> float:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    warmup = options.warmup_steps if options.warmup_steps is not None else max(1, options.steps // 50)
    if step < warmup:
        return options.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, options.steps - warmup)
    floor = options.lr * options.min_lr_ratio
    return floor + (options.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_loss(model: GLMModel, batch: dict[str, torch.Tensor], device) -> torch.Tensor:
    logits = model(batch["tokens"].to(device), batch["positions"].to(device), batch["mask"].to(device)).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].to(device).flatten(), ignore_index=IGNORE)


@torch.no_grad()
def heldout_loss(model: GLMModel, corpus: Corpus, tokenizer: IceTokenizer, options: TrainOptions, device) -> float:
    """Mean loss per target token on held-out windows, with fixed (seeded) blanks."""
    windows = heldout_windows(corpus.heldout, window_length(options.seq_len))
    windows = windows[: options.heldout_batches * options.batch_size]
    if not windows:
        raise GlmcError("the held-out split is shorter than one window: add text or lower --seq-len")
    rng = np.random.default_rng(options.seed + 1)
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), options.batch_size):
        samples = [make_sample(w, tokenizer.special, rng) for w in windows[start:start + options.batch_size]]
        batch = collate(samples, options.seq_len, tokenizer.special.eos)
        targets = int((batch["targets"] != IGNORE).sum())
        total += batch_loss(model, batch, device).item() * targets
        count += targets
    model.train()
    return total / count


def _save(out: Path, model: GLMModel, optimizer, sampler: WindowSampler, result: TrainResult) -> None:
    """The iteration's folder appears whole, then `latest` names it, then older ones go."""
    iteration = str(result.step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{iteration}.partial-", dir=out))
    try:
        save_shard(tmp / shard_name(0), {k: v.detach().cpu() for k, v in model.state_dict().items()
                                          if not k.startswith("rotary")})
        torch.save({"optimizer": optimizer.state_dict(), "step": result.step, "sampler": sampler.state(),
                    "losses": result.losses}, tmp / STATE_FILE)
        os.chmod(tmp, 0o755)
        if (out / iteration).exists():
            shutil.rmtree(out / iteration)
        tmp.rename(out / iteration)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(out / "latest", iteration)
    for old in out.iterdir():
        if old.is_dir() and old.name.isdigit() and old.name != iteration:
            shutil.rmtree(old)


def _start_checkpoint(out: Path, config: GLMConfig, tokenizer: IceTokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer.path, out / TOKENIZER_FILE)
    metadata = {"tokenizer": {"model": TOKENIZER_FILE, "text_offset": tokenizer.text_offset,
                              "variant": tokenizer.variant},
                "description": "trained by glmc train (GLM blank infilling)"}
    text = json.dumps(config_to_sat_args(config, 1, metadata), indent=2, ensure_ascii=False) + "\n"
    write_text_atomic(out / CONFIG_FILE, text)


def train(
    config: GLMConfig,
    tokenizer: IceTokenizer,
    data: list[Path],
    out: Path,
    options: TrainOptions,
    *,
    resume: bool = False,
    device: str = "cpu",
    progress: Callable[[int, float, float], None] | None = None,
) -> TrainResult:
    """Train `config` on `data` into the SAT checkpoint `out` (resuming from it if asked)."""
    out = Path(out)
    if tokenizer.special.dblock >= config.vocab_size:
        raise GlmcError(f"the tokenizer's ids reach {tokenizer.special.dblock}, beyond the model's vocabulary "
                        f"{config.vocab_size}")
    if options.seq_len > config.max_sequence_length:
        raise GlmcError(f"--seq-len {options.seq_len} exceeds the model's maximum sequence length "
                        f"{config.max_sequence_length}")
    corpus = Corpus.build(data, tokenizer)
    model = GLMModel(config, embedding_grad_scale=options.embedding_grad_scale)
    deepnorm_init_(model, options.seed)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, betas=options.betas,
                                  weight_decay=options.weight_decay)
    sampler = WindowSampler(corpus.train, window_length(options.seq_len), options.seed)
    result = TrainResult(step=0)
    if resume:
        _resume(out, config, model, optimizer, sampler, result, device)
    elif out.exists() and any(out.iterdir()):
        raise GlmcError(f"{out}: already holds files; pass --resume to continue that run or choose another --out")
    _start_checkpoint(out, config, tokenizer)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                and torch.cuda.is_bf16_supported() else torch.autocast("cpu", enabled=False))
    started, tokens_seen = time.perf_counter(), 0
    while result.step < options.steps:
        samples = [make_sample(sampler.window(), tokenizer.special, sampler.rng) for _ in range(options.batch_size)]
        batch = collate(samples, options.seq_len, tokenizer.special.eos)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(result.step, options)
        with autocast:
            loss = batch_loss(model, batch, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        optimizer.step()
        result.step += 1
        result.losses.append(loss.item())
        tokens_seen += int((batch["targets"] != IGNORE).sum())
        if progress:
            progress(result.step, result.losses[-1], tokens_seen / (time.perf_counter() - started))
        if options.save_interval and result.step % options.save_interval == 0 and result.step < options.steps:
            _save(out, model, optimizer, sampler, result)
    result.seconds = time.perf_counter() - started
    result.tokens_per_second = tokens_seen / max(result.seconds, 1e-9)
    result.heldout_loss = heldout_loss(model, corpus, tokenizer, options, device)
    _save(out, model, optimizer, sampler, result)
    return result


def _resume(out: Path, config: GLMConfig, model: GLMModel, optimizer, sampler: WindowSampler,
            result: TrainResult, device: str) -> None:
    ckpt = SatCheckpoint.open(out, config)
    state_path = ckpt.root / ckpt.iteration / STATE_FILE
    if not state_path.is_file():
        raise GlmcError(f"{state_path}: missing, so {out} cannot be resumed (it was not written by glmc train)")
    model.load_state_dict({k: v.to(device) for k, v in ckpt.load_shard(0).items()})
    try:
        state = torch.load(state_path, map_location=device, weights_only=True)
    except Exception as error:
        raise GlmcError(f"{state_path}: unreadable training state ({str(error).splitlines()[0]})") from None
    optimizer.load_state_dict(state["optimizer"])
    sampler.restore(state["sampler"])
    result.step = int(state["step"])
    result.losses = list(state["losses"])
