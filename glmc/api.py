"""The Python API: open a model, compute logits, generate.

    import glmc
    model = glmc.load("CKPT")                          # a SAT checkpoint; glmc.load() = embedded model
    logits, cache = model.logits(tokens, position_ids, attention_mask)
    logits, cache = model.logits(next_tokens, next_positions, next_mask, cache)
    result = model.generate("Tsinghua University is in [MASK].", glmc.BeamSearchStrategy(num_beams=4))
    print(result.answers[0])

Conventions are SAT's: token and position ids [batch, seq]; the attention mask is
boolean [batch, 1, seq, past + seq] with True = masked out.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from glmc import backends
from glmc.config import GLMConfig, Mapping, from_name
from glmc.devices import check_device
from glmc.errors import GlmcError
from glmc.generation.filling import Filled, Prompt, fill_blanks, prompt_from_ids, prompt_from_text
from glmc.generation.strategies import BaseStrategy
from glmc.run_spec import RunSpec
from glmc.sources import EMBEDDED_DEFAULT, open_source
from glmc.tokenizer import GLM130B_SPECIAL_TOKENS, IceTokenizer, SpecialTokens

ICETK_MODEL = Path("~/.icetk_models/ice_text.model")

UNDERLINE, GREEN, RESET = "\033[4m", "\x1b[0;32m", "\033[0m"


@dataclass
class Generation:
    """The result for one prompt. Lists run over beams, best first (one entry without beam search)."""

    input_text: str | None  # the prompt as GLM-130B echoes it ("... [gMASK]" appended when it had no mask)
    token_ids: list[list[int]]  # final sequences, blanks in place of their masks, trailing eos dropped
    blank_ids: list[list[list[int]]]  # per beam, each blank's ids in order
    answers: list[str] | None  # detokenized token_ids (None without a tokenizer)
    blanks: list[list[str]] | None  # detokenized blanks
    scores: list[float | None]  # length-penalised beam scores (None for sampling)
    _segments: list[list[tuple[str, bool]]] | None = None
    _gmask: bool = True

    def styled(self, beam: int = 0, ansi: bool = True) -> str:
        """GLM-130B's printed form: blanks underlined (green for [MASK]/[sMASK])."""
        if self._segments is None:
            raise GlmcError("styled output needs a tokenizer")
        english = _is_english(self.input_text or "")
        out = []
        for text, is_blank in self._segments[beam]:
            if not is_blank:
                out.append(text)
                continue
            pad = " " if english else ""
            if ansi:
                start = UNDERLINE if self._gmask else GREEN + UNDERLINE
                end = RESET if self._gmask else RESET + "\x1b[0m"
                out.append(f"{pad}{start}{text}{end}{pad}")
            else:
                out.append(f"{pad}{text}{pad}")
        return "".join(out)


def _is_english(text: str) -> bool:
    return text.isascii()


class GLM:
    """A model ready to run: an Executable, its config, command ids and (optionally) tokenizer.

    With tensor parallelism the other ranks run in worker processes: `close()` (or a
    `with` block) stops them. Calls from several threads are serialised: one call runs
    at a time, the others wait for it.
    """

    def __init__(self, executable, config: GLMConfig, special: SpecialTokens | None,
                 tokenizer: IceTokenizer | None = None, device: str = "cpu", cluster=None):
        self.executable, self.config, self.special = executable, config, special
        self.tokenizer, self.device = tokenizer, device
        self.cluster = cluster
        self._lock = threading.RLock()

    def close(self, clean: bool = True) -> None:
        """Stop the other ranks; `clean=False` (an error or Ctrl-C left a step unfinished)
        terminates them without a stop command."""
        if self.cluster is not None:
            self.cluster.close(clean)
            self.cluster = None

    def __enter__(self) -> "GLM":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(clean=exc_type is None)

    @contextmanager
    def reporting(self):
        """One call at a time; failures of a multi-rank run become one GlmcError naming the rank."""
        with self._lock:
            try:
                yield
            except (RuntimeError, OSError) as error:
                if self.cluster is None:
                    raise
                raise self.cluster.error(error) from None

    # (a) logits ------------------------------------------------------------------------------
    def logits(self, tokens, position_ids, attention_mask, cache=None, *,
               float32: bool = True) -> tuple[torch.Tensor, object]:
        """Logits [batch, seq, vocab] for `tokens`, after `cache` if given; returns the extended cache.

        `float32=False` leaves the logits in the compute dtype.
        """
        tokens = _as_batch(tokens, torch.long, "tokens")
        position_ids = _as_batch(position_ids, torch.long, "position_ids")
        mask = torch.as_tensor(attention_mask)
        if mask.dtype != torch.bool:
            raise GlmcError("attention_mask must be boolean (True = masked out), as in SAT")
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        if tokens.shape != position_ids.shape:
            raise GlmcError(f"tokens {list(tokens.shape)} and position_ids {list(position_ids.shape)} differ")
        past = 0 if cache is None else self.executable.cache_length(cache)
        if mask.shape[-2:] != (tokens.shape[1], past + tokens.shape[1]):
            raise GlmcError(f"attention_mask must end in [{tokens.shape[1]}, {past + tokens.shape[1]}] "
                            f"(new tokens x cached + new), got {list(mask.shape)}")
        if int(position_ids.max()) >= self.config.max_sequence_length or int(position_ids.min()) < 0:
            raise GlmcError(f"position ids must lie in [0, {self.config.max_sequence_length})")
        if int(tokens.max()) >= self.config.vocab_size or int(tokens.min()) < 0:
            raise GlmcError(f"token ids must lie in [0, {self.config.vocab_size})")
        args = (tokens.to(self.device), position_ids.to(self.device), mask.to(self.device))
        with self.reporting():
            if cache is None:
                logits, cache = self.executable.prefill(*args, last_only=False)
            else:
                logits, cache = self.executable.decode(*args, cache)
        return (logits.float() if float32 else logits), cache

    # (b) generation --------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], strategy=None, *,
                 out_seq_length: int = 256,
                 on_step: Callable[[int, list[int]], None] | None = None) -> Generation | list[Generation]:
        """Fill the blanks of one prompt (text or token ids) or of a list of them, batched.

        `out_seq_length` is GLM-130B's: the total length of context plus blank.
        """
        # One prompt is a string or a sequence of integer ids (ints, numpy or 0-d torch integers).
        single = isinstance(prompts, str) or (len(prompts) > 0 and hasattr(prompts[0], "__index__"))
        items = [prompts] if single else list(prompts)
        strategy = strategy if strategy is not None else BaseStrategy()
        beams = getattr(strategy, "num_beams", 1)
        if 2 * beams > self.config.vocab_size:  # each step ranks 2 x beams candidates of the vocabulary
            raise GlmcError(f"--num-beams {beams}: beam search ranks 2 x beams candidates among the model's "
                            f"{self.config.vocab_size} tokens; at most {self.config.vocab_size // 2} beams")
        built = [self.prompt(p) for p in items]
        with self.reporting():
            filled = fill_blanks(self.executable, built, strategy, self.special_tokens(),
                                 out_seq_length=out_seq_length, max_sequence_length=self.config.max_sequence_length,
                                 device=self.device, on_step=on_step)
        results = [self._result(p, f) for p, f in zip(built, filled)]
        return results[0] if single else results

    def prompt(self, prompt: str | Sequence[int]) -> Prompt:
        if isinstance(prompt, str):
            return prompt_from_text(prompt, self._tokenizer().tokenize, self.special_tokens())
        ids = [int(i) for i in prompt]
        if any(not 0 <= i < self.config.vocab_size for i in ids):
            raise GlmcError(f"prompt token ids must lie in [0, {self.config.vocab_size})")
        return prompt_from_ids(ids, self.special_tokens())

    def _result(self, prompt: Prompt, filled: Filled) -> Generation:
        tok = self.tokenizer
        decode = tok.detokenize if tok is not None else None
        return Generation(
            input_text=prompt.text,
            token_ids=filled.token_ids,
            blank_ids=filled.blanks,
            answers=[decode(t) for t in filled.token_ids] if decode else None,
            blanks=[[decode(b) for b in beam] for beam in filled.blanks] if decode else None,
            scores=filled.scores,
            _segments=([[(decode(ids), is_blank) for ids, is_blank in beam] for beam in filled.segments]
                       if decode else None),
            _gmask=prompt.gmask,
        )

    def _tokenizer(self) -> IceTokenizer:
        if self.tokenizer is None:
            raise GlmcError(f"this model has no tokenizer: put icetk's ice_text.model in {ICETK_MODEL.parent}/ "
                            "or pass --tokenizer FILE (glmc never downloads it), or give prompts as token ids "
                            "(--token-ids)")
        return self.tokenizer

    def special_tokens(self) -> SpecialTokens:
        """The command ids (an error naming what to pass when they are unknown)."""
        if self.special is None:
            raise GlmcError("the command token ids of this model are unknown: pass a tokenizer or "
                            "special_tokens")
        return self.special


def _as_batch(values, dtype, name) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=dtype)
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise GlmcError(f"{name} must be [batch, seq], got shape {list(tensor.shape)}")
    return tensor


def load(
    path: str | os.PathLike | None = None,
    *,
    backend: str = "torch",
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    config: str | GLMConfig | None = None,
    tokenizer: str | os.PathLike | None = None,
    tokenizer_variant: str | None = None,
    special_tokens: SpecialTokens | None = None,
    threads: int | None = None,
    torch_compile: bool = False,
    cache_dir: str | os.PathLike | None = None,
    tp_size: int = 1,
    collective_timeout: float = 20.0,
    on_failure=None,
    spawn: bool = True,
    progress: Callable[[str], None] | None = None,
) -> GLM:
    """Open a SAT checkpoint or a compiled package on a backend.

    `dtype` None computes in the model's own dtype, except that the torch backend on
    CPU computes half-precision weights in float32.

    With no path the embedded default model runs; a backend that needs a package
    (onnxruntime) gets one exported on the fly into `cache_dir` (default
    ~/.cache/glmc) and reused afterwards. With `tp_size` > 1 this process runs rank
    0 and starts the other ranks as worker processes (close the model to stop them);
    a rank that hangs stops the run after `collective_timeout` seconds. `spawn=False`:
    the ranks were started by torchrun, this process being rank 0. `progress` receives
    one line per step of a long preparation (building TensorRT engines, kept in
    `cache_dir`/engines).
    """
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    spec = RunSpec(source=None if path is None else str(path), config=config if isinstance(config, str) else None,
                   backend=backend, dtype=dtype, device=device, tp_size=tp_size, threads=threads,
                   torch_compile=torch_compile, collective_timeout=collective_timeout,
                   cache_dir=None if cache_dir is None else str(Path(cache_dir).expanduser()))
    return open_model(spec, tokenizer=tokenizer, tokenizer_variant=tokenizer_variant, special_tokens=special_tokens,
                      on_failure=on_failure, spawn=spawn, progress=progress,
                      model_config=config if isinstance(config, GLMConfig) else None)


def open_model(spec: RunSpec, *, tokenizer: str | os.PathLike | None = None, tokenizer_variant: str | None = None,
               special_tokens: SpecialTokens | None = None, on_failure=None, spawn: bool = True, rendezvous=None,
               model_config: GLMConfig | None = None, progress: Callable[[str], None] | None = None) -> GLM:
    """The model `spec` describes, with its tokenizer: what `load`, the CLI and the server open.

    Under torchrun (`spawn=False`) this process is rank 0 and meets the others at `rendezvous`.
    `progress` receives one line per step of a long preparation (a TensorRT engine build).
    """
    from glmc.sources import is_checkpoint_source

    # Before anything is exported or started: the backend's own needs, then the devices.
    info = backends.check_spec(spec)
    check_device(spec.device, spec.tp_size if spawn else 1)
    if spec.source is None and spec.backend != "torch":
        package = exported_default(spec.cache_path, spec.dtype or "float32", target=info.package_target or "onnxruntime",
                                   tp_size=spec.tp_size, progress=progress)
        spec = replace(spec, source=str(package))
    source = open_source(spec.source, model_config or spec.config)
    cluster = None
    if spec.tp_size > 1:
        from glmc.runtime.launch import Cluster

        if not is_checkpoint_source(source) and source.tp_size != spec.tp_size:
            raise GlmcError(f"{source.root}: exported for TP {source.tp_size}, asked to run at TP {spec.tp_size}")
        source.config.check_mapping(Mapping(spec.tp_size, 0))
        cluster = Cluster(replace(spec, source=str(source.root)), on_failure, spawn=spawn, rendezvous=rendezvous,
                          progress=progress)
        executable = cluster.executable
    else:
        executable = backends.open_rank(spec, Mapping(), source=source, progress=progress)
    if not is_checkpoint_source(source):
        tok, metadata = resolve_package_tokenizer(source, tokenizer, tokenizer_variant), source.manifest
    else:
        tok, metadata = resolve_tokenizer(source, tokenizer, tokenizer_variant), source.metadata
    special = special_tokens or _special_from_metadata(metadata) or (tok.special if tok else None)
    if special is None and source.config.vocab_size > GLM130B_SPECIAL_TOKENS.dblock:
        special = GLM130B_SPECIAL_TOKENS
    return GLM(executable, source.config, special, tok, str(executable.device), cluster)


def export(
    checkpoint: str | os.PathLike | None,
    output: str | os.PathLike,
    *,
    tp_size: int = 1,
    dtype: str | None = None,
    target: str = "onnxruntime",
    config: str | GLMConfig | None = None,
    tokenizer: str | os.PathLike | None = None,
    tokenizer_variant: str | None = None,
    quantization_bits: int | None = None,
    overwrite: bool = False,
    progress=None,
) -> Path:
    """Compile a SAT checkpoint (the embedded model when None) into a package for `target`.

    `quantization_bits` 8 or 4: GLM-130B's weight-only quantization of each layer's four
    matrices, stored as codes and scales (a quantized checkpoint keeps its own either way)."""
    from glmc.checkpoint import SatCheckpoint
    from glmc.graphs import write_package

    root = Path(checkpoint) if checkpoint is not None else EMBEDDED_DEFAULT
    model_config = from_name(config) if isinstance(config, str) else config
    ckpt = SatCheckpoint.open(root, model_config)
    tok = resolve_tokenizer(ckpt, tokenizer, tokenizer_variant)
    special = _special_from_metadata(ckpt.metadata) or (tok.special if tok else None)
    if special is None and ckpt.config.vocab_size > GLM130B_SPECIAL_TOKENS.dblock:
        special = GLM130B_SPECIAL_TOKENS
    tokenizer_entry = None
    if tok is not None:
        tokenizer_entry = {"text_offset": tok.text_offset, "variant": tok.variant,
                           "command_base": tok.special.mask}
    return write_package(ckpt, Path(output), tp_size=tp_size, dtype=dtype, target=target,
                         tokenizer=tokenizer_entry, tokenizer_file=tok.path if tok else None,
                         special_tokens=special.to_dict() if special else None,
                         quantization_bits=quantization_bits, overwrite=overwrite, progress=progress)


def exported_default(cache_dir: Path, dtype: str, target: str = "onnxruntime", wait_seconds: float = 0,
                     tp_size: int = 1, progress: Callable[[str], None] | None = None) -> Path:
    """The embedded model's package for `target` at TP `tp_size`, exported once into `cache_dir`.

    With `wait_seconds`, wait that long for another process (rank 0) to export it instead.
    `progress` hears that the export happens, and how long it took (it happens once).
    """
    from glmc import __version__
    from glmc.errors import GlmcError
    from glmc.fileio import sha256_of
    from glmc.graphs import Package, PackageError

    digest = hashlib.sha256(f"{__version__} {target} {dtype} tp{tp_size}".encode())
    for file in sorted(p for p in EMBEDDED_DEFAULT.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(EMBEDDED_DEFAULT)} {sha256_of(file)}".encode())
    path = cache_dir / f"default-{target}-{dtype}-tp{tp_size}-{digest.hexdigest()[:16]}"
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            Package.open(path)
            return path
        except PackageError:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    if wait_seconds:
        raise GlmcError(f"{path}: rank 0 did not export the embedded model within {wait_seconds:.0f} s")
    if progress:
        progress(f"exporting the embedded model for {target} ({dtype}, TP {tp_size}) into {path}, once: "
                 "later runs reuse it")
    started = time.monotonic()
    try:
        exported = export(None, path, dtype=dtype, target=target, tp_size=tp_size, overwrite=True)
        if progress:
            progress(f"exported in {time.monotonic() - started:.1f} s")
        return exported
    except OSError as error:
        raise GlmcError(f"cannot write the exported default model to {cache_dir}: {error.strerror or error}") from None


def resolve_package_tokenizer(package, path, variant) -> IceTokenizer | None:
    section = package.manifest.get("tokenizer") or {}
    if path is None and "model" not in section:
        return None
    return IceTokenizer(path if path is not None else package.root / section["model"],
                        text_offset=int(section.get("text_offset", 20000)), command_base=section.get("command_base"),
                        variant=variant or section.get("variant", "icetk"))


def resolve_tokenizer(ckpt, path, variant) -> IceTokenizer | None:
    """An explicit file, else the one named in model_config.json, else icetk's usual place for GLM-130B."""
    section = ckpt.metadata.get("tokenizer", {}) or {}
    variant = variant or section.get("variant", "icetk")
    offset = int(section.get("text_offset", 20000))
    command_base = section.get("command_base")
    if path is not None:
        return IceTokenizer(path, text_offset=offset, command_base=command_base, variant=variant)
    if "model" in section:
        return IceTokenizer(ckpt.root / section["model"], text_offset=offset, command_base=command_base,
                            variant=variant)
    if ckpt.config.vocab_size >= GLM130B_SPECIAL_TOKENS.dblock + 1 and ICETK_MODEL.expanduser().is_file():
        return IceTokenizer(ICETK_MODEL, variant=variant, command_base=GLM130B_SPECIAL_TOKENS.mask)
    return None


def _special_from_metadata(metadata) -> SpecialTokens | None:
    ids = metadata.get("special_tokens")
    if not ids:
        return None
    try:
        return SpecialTokens.from_dict(ids)
    except (KeyError, TypeError, ValueError) as error:
        raise GlmcError(f"model_config.json: bad glmc.special_tokens ({error})") from None
