"""GLM-130B's sampling strategies (generation/strategies.py), per batch row.

A strategy object holds only its parameters, so one may serve many generations at
once (threads, server requests). `strategy.start(...)` begins one generation and
returns its state, a `Sampling` or `BeamSearch`, which sees at every step the
logits of every live beam and the token lists so far (context included, no
padding), and answers with the extended token lists and, for each new beam, the
flat index of the beam it continues, so that the runtime can reorder its KV cache.

Numerics follow GLM-130B: filtered logits set to -65504, FP32 softmax,
`torch.multinomial` draws. Each row draws from its own generator, the one its
prompt would use alone: a prompt gives the same tokens whatever it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from glmc.errors import GlmcError

FILTERED = -65504.0  # fp16's lowest value, what GLM-130B writes into removed logits
# Top-p looks among this many best tokens, then this many, before it sorts the whole row: a
# peaked distribution reaches p within a few dozen tokens, a flat one is cheaper to sort.
TOP_P_CANDIDATES = (64, 1024)

Tokens = list[list[list[int]]]  # [batch][beam] -> token ids so far


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """SAT's `top_k_logits` applied row by row: logits [rows, vocab], filtered in place.

    Top-p keeps the best tokens up to and including the one whose cumulative probability
    first exceeds p, as SAT's sort-and-cumsum does, but finds them among the best
    `TOP_P_CANDIDATES` instead of sorting the whole vocabulary every step. A row whose
    cumulative mass passes p within float32 rounding of it (where the order of summation
    decides), or not among the candidates, takes SAT's own sort: the kept set is SAT's.
    """
    if top_k > 0:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = FILTERED
    if top_p > 0.0:
        vocab = logits.shape[-1]
        # The softmax's normaliser over the whole row, computed once, in float32.
        peak = logits.max(dim=-1, keepdim=True).values.float()
        total = torch.exp(logits.float() - peak).sum(dim=-1, keepdim=True)
        # No token holds more than 1 / total of the mass: where even the most candidates cannot
        # reach p (a flat row), the search would end in the sort anyway, so sort at once.
        if bool((TOP_P_CANDIDATES[-1] / total < top_p * (1 - 1e-4)).all()):
            logits.copy_(_sorted_top_p(logits, top_p))
            return logits
        for count in TOP_P_CANDIDATES:
            count = min(count, vocab)
            values, indices = torch.topk(logits, count, dim=-1)  # best first
            cumulative = torch.cumsum(torch.exp(values.float() - peak) / total, dim=-1)
            within = (cumulative <= top_p).sum(dim=-1, keepdim=True)  # tokens before the crossing one
            if bool((within < count).all()):
                break
        keep = torch.arange(count) <= within  # up to and including the crossing token
        filtered = torch.full_like(logits, FILTERED).scatter_(-1, indices, values.masked_fill(~keep, FILTERED))
        # Rows that need SAT's own sort: the mass of the candidates stays within p, or it passes p
        # within the rounding band of a float32 cumulative sum (about n ulps of 1 after n terms).
        band = 1e-6 + 2.5e-7 * (within + 1).float()
        near = [(cumulative.gather(-1, (within + shift).clamp(0, count - 1)) - top_p).abs() < band
                for shift in (-1, 0)]
        exact = (near[0] | near[1] | (within >= count)).view(-1)
        if bool(exact.any()):
            filtered[exact] = _sorted_top_p(logits[exact], top_p)
        logits.copy_(filtered)
    return logits


def _sorted_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """SAT's top-p over whole sorted rows (the reference the fast path agrees with)."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    # Keep the token that crosses the threshold: shift the mask right by one.
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.scatter(-1, sorted_indices, sorted_logits.masked_fill(remove, FILTERED))


def check_finite(logits: torch.Tensor) -> None:
    """NaN or infinite logits would crash the draw (or pick garbage): say where they come from."""
    if not bool(torch.isfinite(logits).all()):
        raise GlmcError("the model computed non-finite logits (NaN or Inf): its weights or the computation "
                        "overflowed; check the weights with `glmc inspect --verify`, or run in float32")


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed` (None: a random seed)."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


class BaseStrategy:
    """Temperature, top-k, top-p sampling (top_k=1 is greedy).

    Defaults are GLM-130B's scripts/generate.sh: temperature 1.0, top_k 0, top_p 0.7.
    `min_gen_length` holds the end tokens back for that many steps (GLM-130B's
    BaseStrategy ignores it; its default 0 changes nothing). `seed` seeds the generator
    of every prompt (None: random).
    """

    num_beams = 1

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.7, *,
                 min_gen_length: int = 0, invalid_slices: tuple = (), seed: int | None = 1234):
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if top_k < 0 or not 0.0 <= top_p <= 1.0:
            raise ValueError("top_k must be >= 0 and top_p within [0, 1]")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.min_gen_length = min_gen_length
        self.invalid_slices = invalid_slices
        self.seed = seed

    def generator(self) -> torch.Generator:
        """The generator one prompt draws from (seeded with this strategy's seed)."""
        return new_generator(self.seed)

    def start(self, batch_size: int, end_tokens: tuple[int, ...],
              generators: list[torch.Generator] | None = None) -> "Sampling":
        """Begin one generation of `batch_size` rows; row r draws from `generators[r]`
        (default: a fresh generator per row)."""
        return Sampling(self, batch_size, tuple(end_tokens),
                        generators if generators is not None else [self.generator() for _ in range(batch_size)])


class Sampling:
    """The state of one BaseStrategy generation."""

    def __init__(self, strategy: BaseStrategy, batch_size: int, end_tokens: tuple[int, ...],
                 generators: list[torch.Generator]):
        if len(generators) != batch_size:
            raise ValueError(f"{len(generators)} generators for {batch_size} rows")
        self.strategy, self.end_tokens, self.generators = strategy, end_tokens, generators
        self.done = [False] * batch_size
        self.length_generated = 0

    @property
    def is_done(self) -> bool:
        return all(self.done)

    def step(self, logits: torch.Tensor, tokens: Tokens) -> tuple[Tokens, list[int]]:
        """logits [batch, 1, vocab] -> tokens extended by one (-1 after a row ended)."""
        s = self.strategy
        batch = logits.shape[0]
        logits = logits.reshape(batch, -1)
        check_finite(logits)
        logits = logits / s.temperature
        if not bool(torch.isfinite(logits).all()):
            dtype = str(logits.dtype).removeprefix("torch.")
            raise GlmcError(f"temperature {s.temperature:g} is too small for {dtype} logits: dividing by it "
                            "overflows; use a larger temperature")
        for invalid in s.invalid_slices:
            logits[..., invalid] = FILTERED
        if s.min_gen_length > self.length_generated:
            for end in self.end_tokens:
                logits[..., end] = FILTERED
        logits = top_k_top_p_filter(logits, s.top_k, s.top_p)
        probs = F.softmax(logits.float(), dim=-1)
        out = []
        for row in range(batch):
            if self.done[row]:
                pick = -1
            else:
                pick = int(torch.multinomial(probs[row:row + 1], num_samples=1, generator=self.generators[row]))
                self.done[row] = pick in self.end_tokens
            out.append([tokens[row][0] + [pick]])
        self.length_generated += 1
        return out, list(range(batch))

    def stop_row(self, row: int, tokens: Tokens) -> None:
        """The row reached its length limit."""
        self.done[row] = True

    def finalize(self, tokens: Tokens) -> "list[list[Beam]]":
        return [[Beam(row[0], None)] for row in tokens]


@dataclass
class Beam:
    tokens: list[int]  # context + generated (+ the end token if it ended)
    score: float | None  # length-penalised log-probability (beam search only)


@dataclass
class _RowState:
    end_beams: list[Beam] = field(default_factory=list)
    bans: list[dict[tuple[int, ...], tuple[int, ...]]] = field(default_factory=lambda: [{}])
    done: bool = False


class BeamSearchStrategy:
    """GLM-130B's beam search: length penalty over the whole sequence (context included),
    n-gram bans keyed on the parent's last n-1 tokens, end tokens held back until
    `min_gen_length`, finished beams ranked by ``score / ((5 + len) / 6) ** length_penalty``.

    Candidates are the top (len(end_tokens) + 1) * num_beams of the joint
    distribution (`deterministic=True`, what GLM-130B's evaluation uses); with
    `deterministic=False` they are drawn by `torch.multinomial`, as GLM-130B's
    generate.py does.
    """

    def __init__(self, num_beams: int = 4, length_penalty: float = 1.0, *, no_repeat_ngram_size: int = 0,
                 min_gen_length: int = 0, consider_end: bool = True, deterministic: bool = True,
                 invalid_slices: tuple = (), seed: int | None = 1234):
        if num_beams < 1:
            raise ValueError("num_beams must be >= 1")
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.ngram, self.min_gen_length = no_repeat_ngram_size, min_gen_length
        self.consider_end, self.deterministic = consider_end, deterministic
        self.invalid_slices = invalid_slices
        self.seed = seed

    def generator(self) -> torch.Generator:
        return new_generator(self.seed)

    def start(self, batch_size: int, end_tokens: tuple[int, ...],
              generators: list[torch.Generator] | None = None) -> "BeamSearch":
        return BeamSearch(self, batch_size, tuple(end_tokens),
                          generators if generators is not None else [self.generator() for _ in range(batch_size)])


class BeamSearch:
    """The state of one BeamSearchStrategy generation."""

    def __init__(self, strategy: BeamSearchStrategy, batch_size: int, end_tokens: tuple[int, ...],
                 generators: list[torch.Generator]):
        if len(generators) != batch_size:
            raise ValueError(f"{len(generators)} generators for {batch_size} rows")
        self.strategy, self.end_tokens, self.generators = strategy, end_tokens, generators
        self.num_beams = strategy.num_beams
        self.rows = [_RowState() for _ in range(batch_size)]
        self.scores: torch.Tensor | None = None  # [batch, beams] cumulative log-probs
        self.length_generated = 0

    @property
    def is_done(self) -> bool:
        return all(r.done for r in self.rows)

    def _penalized(self, score: float, length: int) -> float:
        # In FP32 like GLM-130B's tensors, so that ties and near-ties rank alike.
        factor = ((5.0 + length) / 6) ** self.strategy.length_penalty
        return (torch.tensor(score, dtype=torch.float32) / factor).item()

    def _add_end_beam(self, row: _RowState, score: float, tokens: list[int]) -> None:
        penalized = self._penalized(score, len(tokens))
        # Insert after every strictly better beam, keep the best num_beams.
        at = 0
        while at < len(row.end_beams) and penalized < row.end_beams[at].score:
            at += 1
        row.end_beams.insert(at, Beam(tokens, penalized))
        del row.end_beams[self.num_beams:]

    def joint_scores(self, logits: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        """logits [batch, beams, vocab] -> the score of every continuation [batch, beams * vocab]:
        the beam's score plus the token's log-probability, with the filters, the held-back end
        tokens and the n-gram bans applied (in float32; float32 logits are filtered in place)."""
        s = self.strategy
        batch, beams, vocab = logits.shape
        logits = logits.float()
        for invalid in s.invalid_slices:
            logits[..., invalid] = FILTERED
        if s.min_gen_length > self.length_generated:
            for end in self.end_tokens:
                logits[..., end] = FILTERED
        if s.ngram > 0:
            for b in range(batch):
                for i in range(beams):
                    seq = tokens[b][i]
                    if len(seq) > s.ngram:
                        banned = self.rows[b].bans[i].get(tuple(seq[-(s.ngram - 1):]), ())
                        if banned:
                            logits[b, i, list(banned)] = FILTERED
        scores = F.log_softmax(logits, dim=-1)  # [batch, beams, vocab]
        if self.scores is not None:
            scores = scores + self.scores[..., None]
        return scores.view(batch, beams * vocab)

    def step(self, logits: torch.Tensor, tokens: Tokens) -> tuple[Tokens, list[int]]:
        """logits [batch, beams, vocab] -> num_beams continuing beams per row."""
        check_finite(logits)
        batch, beams, vocab = logits.shape
        flat = self.joint_scores(logits, tokens)
        probs = F.softmax(flat, dim=-1)
        count = (max(1, len(self.end_tokens)) + 1) * self.num_beams
        if self.strategy.deterministic:
            candidates = torch.topk(probs, k=count, dim=-1).indices
        else:
            candidates = torch.cat([torch.multinomial(probs[b:b + 1], num_samples=count,
                                                      generator=self.generators[b]) for b in range(batch)])
        candidate_scores = flat.gather(1, candidates)
        candidate_scores, order = torch.sort(candidate_scores, descending=True, dim=1)
        candidates = candidates.gather(1, order)
        parents, next_tokens = candidates // vocab, candidates % vocab

        ngram = self.strategy.ngram
        new_tokens: Tokens = []
        parent_index: list[int] = []
        new_scores = []
        for b, row in enumerate(self.rows):
            kept, kept_scores, kept_bans = [], [], []
            for parent, token, score in zip(parents[b].tolist(), next_tokens[b].tolist(),
                                            candidate_scores[b].tolist()):
                seq = tokens[b][parent] + [token]
                if not row.done and token in self.end_tokens:
                    self._add_end_beam(row, score, seq)
                elif len(kept) < self.num_beams:
                    kept.append(seq)
                    kept_scores.append(score)
                    parent_index.append(b * beams + parent)
                    if ngram > 0:
                        bans = dict(row.bans[parent])
                        prefix = tuple(tokens[b][parent][-(ngram - 1):])
                        bans[prefix] = bans.get(prefix, ()) + (token,)
                        kept_bans.append(bans)
                else:
                    break
            row.bans = kept_bans if ngram > 0 else [{} for _ in kept]
            new_tokens.append(kept)
            new_scores.append(kept_scores)
        self.scores = torch.tensor(new_scores, dtype=torch.float32)
        self.length_generated += 1
        for b, row in enumerate(self.rows):
            length = len(new_tokens[b][0])
            if (not row.done and len(row.end_beams) == self.num_beams
                    and row.end_beams[-1].score >= self._penalized(self.scores[b].max().item(), length)):
                row.done = True  # no live beam can beat the worst finished one
        return new_tokens, parent_index

    def stop_row(self, row: int, tokens: Tokens) -> None:
        """The row reached its length limit: finish it as `finalize` would."""
        state = self.rows[row]
        if not state.done and self.strategy.consider_end:
            for i, seq in enumerate(tokens[row]):
                self._add_end_beam(state, self.scores[row, i].item(), seq)
        state.done = True

    def finalize(self, tokens: Tokens) -> list[list[Beam]]:
        """Per row, the beams best first (finished ones if `consider_end`)."""
        out = []
        for b, row in enumerate(self.rows):
            if self.strategy.consider_end:
                if not row.done:
                    for i, seq in enumerate(tokens[b]):
                        self._add_end_beam(row, self.scores[b, i].item(), seq)
                    row.done = True
                out.append(list(row.end_beams))
            else:
                out.append([Beam(seq, None) for seq in tokens[b]])
        return out
