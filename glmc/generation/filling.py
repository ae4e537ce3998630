"""GLM blank filling on a KV cache: GLM-130B's generate.py and batch_filling_sequence.

For each blank, left to right: the input is the sequence so far plus `sop`. The
context before `sop` attends bidirectionally; `sop` and the generated tokens are
causal. Positions count up, except for `[MASK]`/`[sMASK]`, where `sop` and every
generated token take the mask's position. Generation stops at an end token or at
the length limit; the blank replaces its mask and the next mask is filled.

Prompts of a batch are left-padded so that every row's `sop` sits in the last
column; padding is masked out and takes position 0, so each row computes what it
would alone (glmc.generation.batch runs the batch).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from glmc.errors import GlmcError, PromptError
from glmc.generation.batch import Batch
from glmc.generation.strategies import Beam, Tokens
from glmc.tokenizer.special import SpecialTokens

MASK_PATTERN = re.compile(r"\[[sg]?MASK\]")


class Executable(Protocol):
    """What generation needs from a backend (see glmc.backends)."""

    def prefill(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *, last_only: bool = True, capacity: int | None = None) -> tuple[torch.Tensor, object]: ...

    def decode(self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
               cache: object) -> tuple[torch.Tensor, object]: ...

    def reorder_cache(self, cache: object, index: torch.Tensor) -> object: ...

    def join_caches(self, caches: list, capacity: int, skip: list[int] | None = None) -> object: ...

    def cache_length(self, cache: object) -> int: ...


class Strategy(Protocol):
    """Sampling parameters (glmc.generation.strategies); `start` returns one generation's state."""

    num_beams: int

    def generator(self) -> torch.Generator: ...

    def start(self, batch_size: int, end_tokens: tuple[int, ...],
              generators: list[torch.Generator] | None = None) -> "StrategyRun": ...


class StrategyRun(Protocol):
    is_done: bool

    def step(self, logits: torch.Tensor, tokens: Tokens) -> tuple[Tokens, list[int]]: ...

    def stop_row(self, row: int, tokens: Tokens) -> None: ...

    def finalize(self, tokens: Tokens) -> list[list[Beam]]: ...


@dataclass(frozen=True)
class GenerationInput:
    """One row to generate from: a context ending in `sop`, its positions and mask, target positions."""

    tokens: list[int]
    position_ids: list[int]  # of the context
    attention_mask: torch.Tensor  # [context, context] bool, True = masked out
    target_position_ids: list[int]  # of each generated token; their count is the length limit

    @property
    def max_new_tokens(self) -> int:
        return len(self.target_position_ids)


@dataclass(frozen=True)
class BlankRequest:
    context: list[int]  # the sequence with its masks, then sop
    mask_position: int  # index of the mask being filled
    gmask: bool  # positions count on ([gMASK]) or stay at the mask ([MASK], [sMASK])
    max_new_tokens: int

    def generation_input(self) -> GenerationInput:
        n = len(self.context)
        positions = blank_position_ids(self, self.max_new_tokens)
        return GenerationInput(list(self.context), positions[:n], blank_attention_mask(n, n), positions[n:])


def blank_position_ids(request: BlankRequest, steps: int) -> list[int]:
    """Positions of the context and of `steps` generated tokens (generate.py's rule)."""
    n = len(request.context)
    positions = list(range(n + steps))
    if not request.gmask:
        positions[n - 1:] = [request.mask_position] * (steps + 1)
    return positions


def blank_attention_mask(context_length: int, total_length: int) -> torch.Tensor:
    """[total, total] bool, True = masked: causal, plus the whole context before sop visible to all."""
    visible = torch.ones(total_length, total_length, dtype=torch.bool).tril()
    visible[:, : context_length - 1] = True
    return ~visible


def generate_blanks(
    executable: Executable,
    requests: list[BlankRequest],
    strategy: Strategy,
    special: SpecialTokens,
    *,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, list[list[int]]], None] | None = None,
    generators: list[torch.Generator] | None = None,
) -> list[list[Beam]]:
    """Generate one blank for each request, batched; per request the beams, best first."""
    return generate(executable, [r.generation_input() for r in requests], strategy, special, device=device,
                    on_step=on_step, generators=generators)


def generate(
    executable: Executable,
    inputs: list[GenerationInput],
    strategy: Strategy,
    special: SpecialTokens,
    *,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, list[list[int]]], None] | None = None,
    generators: list[torch.Generator] | None = None,
) -> list[list[Beam]]:
    """Generate after each input's context, batched; per input the beams, best first.

    A generated token sees what the context's last token (`sop`) sees and the tokens
    generated before it (GLM-130B's evaluation/model.py `generate_text`). Input i draws
    from `generators[i]` (default: a fresh one per input, seeded as the strategy says);
    `on_step(i, beams)` sees input i's token lists after each of its steps. Inputs that
    finish leave the batch; the others go on.
    """
    if generators is None:
        generators = [strategy.generator() for _ in inputs]
    hooks = None if on_step is None else [functools.partial(on_step, i) for i in range(len(inputs))]
    batch = Batch(executable, special, device)
    groups = batch.join(inputs, strategy, generators, hooks)
    while batch.groups:
        for group in batch.step():
            if group.error is not None:
                raise GlmcError(group.error)
    return [group.result for group in groups]


def generated_tokens(tokens: list[int], context_length: int, end_tokens: tuple[int, ...]) -> list[int]:
    """What a beam generated: after the context, up to its end (-1 padding) and without the end token."""
    end = tokens.index(-1) if -1 in tokens else len(tokens)
    if end > context_length and tokens[end - 1] in end_tokens:
        end -= 1
    return tokens[context_length:end]


@dataclass
class Prompt:
    """A prompt ready to fill: its ids and which mask kind generation uses."""

    ids: list[int]
    mask_id: int  # the mask kind filled: [MASK] if present, else [sMASK], else [gMASK]
    gmask: bool  # no [MASK]/[sMASK] anywhere: positions count on
    text: str | None = None  # the raw text as GLM-130B echoes it (with " [gMASK]" appended)


def tokenize_with_masks(text: str, tokenize: Callable[[str], list[int]], special: SpecialTokens) -> list[int]:
    """Text with [MASK], [sMASK], [gMASK] written in it: the text around them tokenized, each mask its id."""
    pieces = MASK_PATTERN.split(text)
    ids: list[int] = []
    for piece, mask in zip(pieces, MASK_PATTERN.findall(text)):
        ids += tokenize(piece) + [special.command(mask)]
    return ids + tokenize(pieces[-1])


def prompt_from_text(raw_text: str, tokenize: Callable[[str], list[int]], special: SpecialTokens) -> Prompt:
    """generate.py's fill_blanks preamble: tokenize around masks, append [gMASK] and eos as needed."""
    mask_name = "[MASK]" if "[MASK]" in raw_text else "[sMASK]" if "[sMASK]" in raw_text else "[gMASK]"
    gmask = "[MASK]" not in raw_text and "[sMASK]" not in raw_text
    ids = tokenize_with_masks(raw_text, tokenize, special)
    if "MASK]" not in raw_text:
        ids.append(special.gmask)
        raw_text += " [gMASK]"
    if not raw_text.endswith("MASK]"):
        ids.append(special.eos)
    return Prompt(ids, special.command(mask_name), gmask, raw_text)


def prompt_from_ids(ids: list[int], special: SpecialTokens) -> Prompt:
    """The same rules for a prompt given as token ids (an id prompt already ending in eos keeps it)."""
    ids = list(ids)
    masks = (special.mask, special.smask, special.gmask)
    mask_id = special.mask if special.mask in ids else special.smask if special.smask in ids else special.gmask
    gmask = special.mask not in ids and special.smask not in ids
    if not any(i in masks for i in ids):
        ids.append(special.gmask)
    if ids[-1] not in masks and ids[-1] != special.eos:
        ids.append(special.eos)
    return Prompt(ids, mask_id, gmask)


@dataclass
class Filled:
    """One prompt's result: per beam (one without beam search), best first."""

    token_ids: list[list[int]]  # the final sequences, blanks in place of their masks
    blanks: list[list[list[int]]]  # per beam, the ids of each blank in order
    segments: list[list[tuple[list[int], bool]]] = field(default_factory=list)  # (ids, is_blank) runs
    scores: list[float | None] = field(default_factory=list)


def fill_blanks(
    executable: Executable,
    prompts: list[Prompt],
    strategy: Strategy,
    special: SpecialTokens,
    *,
    out_seq_length: int,
    max_sequence_length: int,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, list[int]], None] | None = None,
    generators: list[torch.Generator] | None = None,
) -> list[Filled]:
    """Fill every mask of every prompt, left to right, prompts batched per round.

    `on_step(prompt_index, blank_ids)` sees the best beam's blank after every step.
    Prompt i draws from `generators[i]` across all its blanks (default: one generator per
    prompt seeded with the strategy's seed), so it gives what it gives alone.
    """
    if out_seq_length > max_sequence_length:
        raise PromptError(f"--out-seq-length {out_seq_length} exceeds the model's maximum sequence "
                          f"length {max_sequence_length}")
    for index, prompt in enumerate(prompts):
        if len(prompt.ids) > max_sequence_length:
            raise PromptError(f"prompt {index + 1} is {len(prompt.ids)} tokens long; the model takes at "
                              f"most {max_sequence_length}")
    if generators is None:
        generators = [strategy.generator() for _ in prompts]
    states = [FillState(p, strategy.num_beams) for p in prompts]
    while active := [s for s in states if not s.done]:
        requests = [state.next_request(special, out_seq_length, states.index(state)) for state in active]
        step_hook = None
        if on_step is not None:
            rows = [states.index(s) for s in active]

            def step_hook(r: int, beams: list[list[int]]) -> None:  # the best beam's blank so far
                on_step(rows[r], beams[0][len(requests[r].context):])
        results = generate_blanks(executable, requests, strategy, special, device=device, on_step=step_hook,
                                  generators=[generators[states.index(s)] for s in active])
        for state, request, beams in zip(active, requests, results):
            state.absorb(request, beams, special)
    return [s.result(special) for s in states]


class FillState:
    """generate.py's bookkeeping for one prompt across its blanks (fill_blanks and the server
    drive it: `next_request`, generate the blank, `absorb`, until `done`)."""

    def __init__(self, prompt: Prompt, num_beams: int):
        self.prompt = prompt
        self.outputs: list[list[int]] = [list(prompt.ids)]
        self.last_pos = [0] * num_beams
        self.segments: list[list[tuple[list[int], bool]]] = [[] for _ in range(num_beams)]
        self.blanks: list[list[list[int]]] = [[] for _ in range(num_beams)]
        self.scores: list[float | None] = [None]

    @property
    def done(self) -> bool:
        """Every mask is filled (the next blank continues the best beam, as generate.py does)."""
        return self.prompt.mask_id not in self.outputs[0]

    def next_request(self, special: SpecialTokens, out_seq_length: int, index: int = 0) -> BlankRequest:
        """The next blank to generate: the leftmost mask of the best sequence so far, its room
        what `out_seq_length` (the total length) leaves after the context and sop."""
        seq = self.outputs[0]
        context = seq + [special.sop]
        room = out_seq_length - len(context)
        if room <= 0:
            raise PromptError(f"prompt {index + 1} is {len(context)} tokens long with its sop; "
                              f"--out-seq-length {out_seq_length} (the total length) leaves no room to generate")
        return BlankRequest(context, seq.index(self.prompt.mask_id), self.prompt.gmask, room)

    def absorb(self, request: BlankRequest, beams: list[Beam], special: SpecialTokens) -> None:
        sop_index = len(request.context) - 1
        mask_position = request.mask_position
        self.outputs, self.scores = [], []
        for i, beam in enumerate(beams):
            output = beam.tokens
            blank = generated_tokens(output, sop_index + 1, special.end_tokens)
            if i >= len(self.segments):  # more beams than the first round had
                self.segments.append([])
                self.blanks.append([])
                self.last_pos.append(0)
            self.segments[i] += [(output[self.last_pos[i]:mask_position], False), (blank, True)]
            self.blanks[i].append(blank)
            self.last_pos[i] = mask_position + len(blank)
            self.outputs.append(output[:mask_position] + blank + output[mask_position + 1:sop_index])
            self.scores.append(beam.score)

    def result(self, special: SpecialTokens) -> Filled:
        token_ids, segments = [], []
        for i, output in enumerate(self.outputs):
            if output and output[-1] == special.eos:
                output = output[:-1]
            token_ids.append(output)
            segments.append(self.segments[i] + [(output[self.last_pos[i]:], False)])
        return Filled(token_ids, self.blanks[: len(self.outputs)], segments, self.scores)
