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
from glmc.fileio import (
    atomic_directory,
    finite_number,
    remove_stale_temporaries,
    temporary_sibling,
    temporary_writer,
    write_text_atomic,
)
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

    def __post_init__(self) -> None:
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise GlmcError(f"training option {name} must be an integer >= {low}, got {value!r:.40}")

        def number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
            if (not finite_number(value) or value < low or value > high or (low_open and value == low)):
                bounds = f"{'(' if low_open else '['}{low}, {high}]"
                raise GlmcError(f"training option {name} must be a finite number in {bounds}, got {value!r:.40}")

        for name, low in (("steps", 1), ("batch_size", 1), ("seq_len", 16), ("seed", 0), ("save_interval", 0),
                          ("heldout_batches", 1)):
            integer(name, low)
        if self.warmup_steps is not None:
            integer("warmup_steps", 1)
        number("lr", self.lr, 0.0, math.inf, low_open=True)
        number("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        number("weight_decay", self.weight_decay, 0.0, math.inf)
        number("grad_clip", self.grad_clip, 0.0, math.inf, low_open=True)
        number("embedding_grad_scale", self.embedding_grad_scale, 0.0, 1.0)
        if not isinstance(self.betas, tuple) or len(self.betas) != 2:
            raise GlmcError(f"training option betas must be two numbers, got {self.betas!r:.40}")
        for beta in self.betas:
            number("betas", beta, 0.0, 1.0)
            if beta == 1.0:
                raise GlmcError("training option betas must be below 1 (AdamW divides by 1 - beta^step)")


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


def _save(out: Path, model: GLMModel, optimizer, sampler: WindowSampler, result: TrainResult,
          config: GLMConfig, tokenizer: IceTokenizer) -> None:
    """The iteration's folder appears whole, then `latest` names it, then older ones go.

    `out` itself is made at the first save, with the model config and the tokenizer, so that a
    run stopped before it leaves nothing behind."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "latest").is_file():  # the first save of this run: the files every save shares
        _write_run_files(out, config, tokenizer)
    iteration = str(result.step)
    with atomic_directory(out / iteration, overwrite=True) as tmp:
        save_shard(tmp / shard_name(0), {k: v.detach().cpu() for k, v in model.state_dict().items()
                                         if not k.startswith("rotary")})
        torch.save({"optimizer": optimizer.state_dict(), "step": result.step, "sampler": sampler.state(),
                    "losses": result.losses}, tmp / STATE_FILE)
    write_text_atomic(out / "latest", iteration)
    for old in out.iterdir():
        if old.is_dir() and old.name.isdigit() and old.name != iteration:
            shutil.rmtree(old)


def _write_run_files(out: Path, config: GLMConfig, tokenizer: IceTokenizer) -> None:
    tmp = temporary_sibling(out / TOKENIZER_FILE)
    try:
        shutil.copyfile(tokenizer.path, tmp)
        os.replace(tmp, out / TOKENIZER_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    metadata = {"tokenizer": {"model": TOKENIZER_FILE, "text_offset": tokenizer.text_offset,
                              "variant": tokenizer.variant},
                "description": "trained by glmc train (GLM blank infilling)"}
    text = json.dumps(config_to_sat_args(config, 1, metadata), indent=2, ensure_ascii=False) + "\n"
    write_text_atomic(out / CONFIG_FILE, text)


# What a run writes into --out besides its checkpoints; all that one stopped before its first
# save may have left (older versions wrote these two at the start).
_RUN_FILES = (CONFIG_FILE, TOKENIZER_FILE)


def check_out(out: Path, resume: bool) -> None:
    """Refuse an --out a run cannot use, before any work: one holding another run's checkpoint
    (without --resume), one with nothing to resume (with it), foreign files, a live writer."""
    if out.exists() and not out.is_dir():
        raise GlmcError(f"--out {out}: not a folder")
    if out.is_dir():
        remove_stale_temporaries(out)  # left by a run that was killed while saving
        for entry in out.iterdir():
            writer = temporary_writer(entry.name)
            if writer is not None:
                raise GlmcError(f"--out {out}: process {writer[0]} on {writer[1]} is writing into it")
    has_checkpoint = (out / "latest").is_file()
    if resume and not has_checkpoint:
        raise GlmcError(f"--resume: {out} holds no checkpoint to resume (no 'latest': the run stopped before "
                        "its first save); start the run again without --resume")
    if resume:
        return
    if has_checkpoint:
        raise GlmcError(f"{out}: already holds files; pass --resume to continue that run or choose another --out")
    foreign = sorted(e.name for e in out.iterdir() if e.name not in _RUN_FILES) if out.is_dir() else []
    if foreign:
        raise GlmcError(f"{out}: already holds files that are not a glmc train run ({foreign[0][:80]}"
                        f"{', ...' if len(foreign) > 1 else ''}); choose another --out")
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GlmcError(f"--out {out}: cannot be written ({existing}: permission denied)")


def check_batch_fits(config: GLMConfig, options: TrainOptions, device: str) -> None:
    """Refuse a step whose logits alone (float32, and their gradient) exceed the device's memory:
    it could only fail after minutes of building samples, or swap the machine to a halt."""
    need = 2 * 4 * options.batch_size * options.seq_len * config.vocab_size
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GlmcError(f"--device {device}: this machine has no CUDA device")
        have, where = torch.cuda.get_device_properties(torch.device(device)).total_memory, device
    else:
        try:
            have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine"
        except (ValueError, OSError, AttributeError):
            return
    if need > have:
        raise GlmcError(f"--batch-size {options.batch_size} x --seq-len {options.seq_len} needs at least "
                        f"{need / 2**30:,.1f} GiB for the logits and their gradient, more than {where}'s "
                        f"{have / 2**30:,.1f} GiB: lower --batch-size")


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
    check_out(out, resume)
    check_batch_fits(config, options, device)
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
        if not math.isfinite(result.losses[-1]):
            raise GlmcError(f"step {result.step}: the training loss is {result.losses[-1]} (the run diverged): "
                            "lower --lr or lengthen --warmup-steps"
                            + (f"; {out} keeps the last checkpoint" if (out / "latest").is_file() else ""))
        tokens_seen += int((batch["targets"] != IGNORE).sum())
        if progress:
            progress(result.step, result.losses[-1], tokens_seen / (time.perf_counter() - started))
        if options.save_interval and result.step % options.save_interval == 0 and result.step < options.steps:
            _save(out, model, optimizer, sampler, result, config, tokenizer)
    result.seconds = time.perf_counter() - started
    result.tokens_per_second = tokens_seen / max(result.seconds, 1e-9)
    result.heldout_loss = heldout_loss(model, corpus, tokenizer, options, device)
    _save(out, model, optimizer, sampler, result, config, tokenizer)
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
        optimizer.load_state_dict(state["optimizer"])
        sampler.restore(state["sampler"])
        step, losses = state["step"], state["losses"]
        if not isinstance(step, int) or not isinstance(losses, list) or len(losses) != step:
            raise ValueError(f"step {step!r:.20} does not match {len(losses)} recorded losses")
    except Exception as error:  # a damaged or foreign file: whatever torch or the state raises
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise GlmcError(f"{state_path}: unreadable training state ({detail})") from None
    result.step = step
    result.losses = [float(x) for x in losses]
