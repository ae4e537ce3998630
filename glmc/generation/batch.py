"""A batch of generations decoded together, which generations join and leave between steps.

Each generation (a `Group`: one input, its strategy's state, its generator) owns a block
of rows of the batch (one row when sampling, one per beam in beam search). The rows
share one KV cache, left-padded so that every row's newest token sits in the last
column; padding is masked out and takes position 0, so each row computes what it would
alone. A cycle (`step`) is: new generations join (their contexts prefilled together,
their cache rows merged into the batch's, the shorter side left-padded); every
generation picks its next tokens from its last logits (its own strategy, its own
generator; on several cores they draw in parallel, which changes no draw); finished
generations leave (their rows dropped from the cache); the rest decode one token
together. When generations join, the cache's leading positions that are padding in
every remaining row (left by generations that have left) are dropped, so the cache
stays as long as the longest live row, not the batch's history. A generation whose
step fails on its own input (its sampling, not the model) finishes with `error` and
the others go on. `generate` runs a fixed list of inputs this way; the server keeps a
batch running and adds requests as they come (continuous batching).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from glmc.errors import GlmcError
from glmc.generation.strategies import Beam, Tokens

if TYPE_CHECKING:
    from glmc.generation.filling import Executable, GenerationInput, Strategy
    from glmc.tokenizer.special import SpecialTokens


@dataclass(eq=False)
class Group:
    """One generation in a batch."""

    input: "GenerationInput"
    run: object  # the strategy's state for this generation (a Sampling or BeamSearch)
    generator: torch.Generator  # what its strategy draws from
    on_step: Callable[[list[list[int]]], None] | None = None  # sees the group's token lists after each step
    beams: list[list[int]] = field(default_factory=list)  # token lists of its rows, context first
    steps: int = 0  # tokens generated so far
    logits: torch.Tensor | None = None  # [rows, vocab] of its last call, waiting to be sampled
    result: list[Beam] | None = None  # once finished: the beams, best first
    error: str | None = None  # why it stopped early, if its own step failed (then result is [])

    @property
    def rows(self) -> int:
        return len(self.beams)

    @property
    def finished(self) -> bool:
        return self.result is not None


Drawn = tuple[Tokens, list[int]] | GlmcError  # a group's step: its token lists and beam parents, or why it failed
# From this vocabulary size a row's sort and draw take milliseconds and groups draw in parallel;
# below it a draw is mostly Python, and threads would only contend for the interpreter.
PARALLEL_SAMPLING_VOCAB = 32768


class Batch:
    def __init__(self, executable: "Executable", special: "SpecialTokens", device: torch.device | str = "cpu",
                 sampling_threads: int | None = None):
        self.executable, self.special, self.device = executable, special, device
        # Sampling is on the CPU whatever the model's device: a sort and a draw over the whole
        # vocabulary per row, most of a many-row step on CPU unless the cores share it.
        # None: every intra-op thread for a large vocabulary (PARALLEL_SAMPLING_VOCAB), else one.
        self.sampling_threads = sampling_threads
        self.groups: list[Group] = []
        self.cache = None
        self.key_masked = torch.zeros(0, 0, dtype=torch.bool)  # [rows, keys]: True = masked (padding)

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.groups)

    @property
    def length(self) -> int:
        return self.key_masked.shape[1]

    @property
    def dead_columns(self) -> int:
        """Leading cache positions that are padding in every row (rows that held them have left)."""
        if not self.key_masked.numel():
            return 0
        live = (~self.key_masked).any(0).nonzero()
        return int(live[0]) if live.numel() else self.length

    @property
    def live_length(self) -> int:
        """The cache's length once its dead columns are dropped (as the next join does)."""
        return self.length - self.dead_columns

    def _capacity(self, groups: list[Group], length: int) -> int:
        """Positions the cache needs: every group's remaining tokens after `length`."""
        return length + max(g.input.max_new_tokens - g.steps for g in groups)

    def join(self, inputs: list["GenerationInput"], strategy: "Strategy | list[Strategy]",
             generators: list[torch.Generator], on_step: list | None = None) -> list[Group]:
        """Prefill `inputs` together and add them to the batch (one generation each), with one
        strategy for all or one per input (a server's requests each bring their own)."""
        strategies = strategy if isinstance(strategy, list) else [strategy] * len(inputs)
        pad_id = self.special.eos  # any valid id: padding is masked out
        width = max(len(i.tokens) for i in inputs)
        pads = [width - len(i.tokens) for i in inputs]
        tokens = torch.tensor([[pad_id] * p + i.tokens for p, i in zip(pads, inputs)])
        positions = torch.tensor([[0] * p + i.position_ids for p, i in zip(pads, inputs)])
        mask = torch.ones(len(inputs), 1, width, width, dtype=torch.bool)
        for row, (p, i) in enumerate(zip(pads, inputs)):
            n = len(i.tokens)
            mask[row, 0, p:, p:] = i.attention_mask
            mask[row, 0, :p, p:p + max(n - 1, 1)] = False  # padding rows see the context: no empty softmax
        key_masked = torch.stack([torch.cat((torch.ones(p, dtype=torch.bool), i.attention_mask[-1]))
                                  for p, i in zip(pads, inputs)])
        groups = [Group(i, s.start(1, self.special.end_tokens, [g]), g, (on_step or [None] * len(inputs))[k],
                        [list(i.tokens)]) for k, (i, s, g) in enumerate(zip(inputs, strategies, generators))]
        skip = self.dead_columns
        length = max(width, self.length - skip)
        capacity = self._capacity(self.groups + groups, length)
        logits, cache = self.executable.prefill(tokens.to(self.device), positions.to(self.device),
                                                mask.to(self.device), last_only=True, capacity=capacity)
        for group, row_logits in zip(groups, logits.reshape(len(inputs), -1)):
            group.logits = row_logits[None]
        if self.cache is None:
            self.cache, self.key_masked = cache, key_masked
        else:  # left-pad the shorter side to the longer one, then the new rows after the batch's
            self.cache = self.executable.join_caches([self.cache, cache], capacity, [skip, 0])
            self.key_masked = torch.cat((_left_padded(self.key_masked[:, skip:], length),
                                         _left_padded(key_masked, length)))
        self.groups += groups
        return groups

    def step(self) -> list[Group]:
        """Every generation picks its next tokens; finished ones leave; the rest decode one token.
        Returns the generations that finished."""
        index: list[int] = []  # for each row after this step, the cache row it continues
        finished, offset = [], 0
        for group, drawn in zip(self.groups, self._draw()):
            rows = group.rows
            if isinstance(drawn, GlmcError):  # this generation's own draw (e.g. a temperature that overflows)
                group.error, group.result = str(drawn), []
                finished.append(group)
                offset += rows
                continue
            beams, parents = drawn
            group.beams, group.steps, group.logits = beams[0], group.steps + 1, None
            if group.on_step is not None:
                group.on_step(group.beams)
            if group.steps >= group.input.max_new_tokens:
                group.run.stop_row(0, [group.beams])
            if group.run.is_done:
                group.result = group.run.finalize([group.beams])[0]
                finished.append(group)  # its rows leave the cache
            else:
                index += [offset + parent for parent in parents]
            offset += rows
        self.groups = [g for g in self.groups if not g.finished]
        self._keep_rows(index, offset)
        if self.groups:
            self._decode()
        return finished

    def _draw(self) -> list[Drawn]:
        """Every group's step on its last logits. Groups draw from their own generators, so they
        may draw at once, each exactly as alone; where two share a generator, all draw in turn."""
        threads = self.sampling_threads
        if threads is None:
            vocab = self.groups[0].logits.shape[-1] if self.groups else 0
            threads = torch.get_num_threads() if vocab >= PARALLEL_SAMPLING_VOCAB else 1
        workers = min(len(self.groups), threads)
        generators = {id(g.generator) for g in self.groups}
        if workers < 2 or len(generators) < len(self.groups):
            return [_draw(g) for g in self.groups]
        with ThreadPoolExecutor(workers, thread_name_prefix="glmc-sampling") as pool:
            return list(pool.map(_draw, self.groups))

    def cancel(self, group: Group) -> None:
        """Drop a generation (its client left): its rows leave at once."""
        offset = 0
        keep = []
        for g in self.groups:
            if g is not group:
                keep += range(offset, offset + g.rows)
            offset += g.rows
        self.groups = [g for g in self.groups if g is not group]
        self._keep_rows(keep, offset)

    def _keep_rows(self, index: list[int], rows: int) -> None:
        """The cache's `rows` rows become rows `index` of them (beam parents; leaving groups dropped)."""
        if not self.groups:
            self.cache, self.key_masked = None, torch.zeros(0, 0, dtype=torch.bool)
        elif index != list(range(rows)):
            chosen = torch.tensor(index, dtype=torch.long)
            self.cache = self.executable.reorder_cache(self.cache, chosen.to(self.device))
            self.key_masked = self.key_masked.index_select(0, chosen)

    def _decode(self) -> None:
        pad_id = self.special.eos
        last = torch.tensor([[seq[-1] if seq[-1] >= 0 else pad_id] for g in self.groups for seq in g.beams])
        # A row past its limit has stopped: its (ignored) token reuses its last position.
        positions = torch.tensor([[g.input.target_position_ids[min(g.steps, g.input.max_new_tokens) - 1]]
                                  for g in self.groups for _ in g.beams])
        self.key_masked = torch.cat((self.key_masked, torch.zeros(self.key_masked.shape[0], 1, dtype=torch.bool)), 1)
        logits, self.cache = self.executable.decode(last.to(self.device), positions.to(self.device),
                                                    self.key_masked[:, None, None, :].to(self.device), self.cache)
        offset = 0
        logits = logits.reshape(last.shape[0], -1)
        for group in self.groups:
            group.logits = logits[offset:offset + group.rows]
            offset += group.rows


def _draw(group: Group) -> Drawn:
    try:
        return group.run.step(group.logits.reshape(1, group.rows, -1).cpu(), [group.beams])
    except GlmcError as error:
        return error


def _left_padded(key_masked: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - key_masked.shape[1]
    return torch.cat((torch.ones(key_masked.shape[0], pad, dtype=torch.bool), key_masked), 1) if pad else key_masked
