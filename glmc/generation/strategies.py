"""GLM-130B's sampling strategies (generation/strategies.py), per batch row.

Each strategy sees, at every step, the logits of every live beam and the token
lists so far (context included, no padding), and answers with the extended token
lists and, for each new beam, the flat index of the beam it continues, so that
the runtime can reorder its KV cache. Numerics follow GLM-130B: filtered logits
set to -65504, FP32 softmax, `torch.multinomial` draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FILTERED = -65504.0  # fp16's lowest value, what GLM-130B writes into removed logits

Tokens = list[list[list[int]]]  # [batch][beam] -> token ids so far


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """SAT's `top_k_logits` applied row by row: logits [rows, vocab], filtered in place."""
    if top_k > 0:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits[logits < kth] = FILTERED
    if top_p > 0.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cumulative > top_p
        # Keep the token that crosses the threshold: shift the mask right by one.
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits.scatter_(-1, sorted_indices, sorted_logits.masked_fill(remove, FILTERED))
    return logits


class _Seeded:
    def __init__(self, seed: int | None):
        self.seed = seed
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()


class BaseStrategy:
    """Temperature, top-k, top-p sampling (top_k=1 is greedy).

    Defaults are GLM-130B's scripts/generate.sh: temperature 1.0, top_k 0, top_p 0.7.
    `min_gen_length` holds the end tokens back for that many steps (GLM-130B's
    BaseStrategy ignores it; its default 0 changes nothing).
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
        self._rng = _Seeded(seed)
        self.end_tokens: tuple[int, ...] = ()
        self.done: list[bool] = []
        self.length_generated = 0

    def start(self, batch_size: int, end_tokens: tuple[int, ...]) -> None:
        self.end_tokens = tuple(end_tokens)
        self.done = [False] * batch_size
        self.length_generated = 0

    @property
    def is_done(self) -> bool:
        return all(self.done)

    def step(self, logits: torch.Tensor, tokens: Tokens) -> tuple[Tokens, list[int]]:
        """logits [batch, 1, vocab] -> tokens extended by one (-1 after a row ended)."""
        batch = logits.shape[0]
        logits = logits.reshape(batch, -1) / self.temperature
        for invalid in self.invalid_slices:
            logits[..., invalid] = FILTERED
        if self.min_gen_length > self.length_generated:
            for end in self.end_tokens:
                logits[..., end] = FILTERED
        logits = top_k_top_p_filter(logits, self.top_k, self.top_p)
        probs = F.softmax(logits.float(), dim=-1)
        picks = torch.multinomial(probs, num_samples=1, generator=self._rng.generator).view(-1).tolist()
        out = []
        for row, pick in enumerate(picks):
            if self.done[row]:
                pick = -1
            elif pick in self.end_tokens:
                self.done[row] = True
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
        self._rng = _Seeded(seed)
        self.end_tokens: tuple[int, ...] = ()
        self.rows: list[_RowState] = []
        self.scores: torch.Tensor | None = None  # [batch, beams] cumulative log-probs
        self.length_generated = 0

    def start(self, batch_size: int, end_tokens: tuple[int, ...]) -> None:
        self.end_tokens = tuple(end_tokens)
        self.rows = [_RowState() for _ in range(batch_size)]
        self.scores = None
        self.length_generated = 0

    @property
    def is_done(self) -> bool:
        return all(r.done for r in self.rows)

    def _penalized(self, score: float, length: int) -> float:
        # In FP32 like GLM-130B's tensors, so that ties and near-ties rank alike.
        factor = ((5.0 + length) / 6) ** self.length_penalty
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
        batch, beams, vocab = logits.shape
        logits = logits.float()
        for invalid in self.invalid_slices:
            logits[..., invalid] = FILTERED
        if self.min_gen_length > self.length_generated:
            for end in self.end_tokens:
                logits[..., end] = FILTERED
        if self.ngram > 0:
            for b in range(batch):
                for i in range(beams):
                    seq = tokens[b][i]
                    if len(seq) > self.ngram:
                        banned = self.rows[b].bans[i].get(tuple(seq[-(self.ngram - 1):]), ())
                        if banned:
                            logits[b, i, list(banned)] = FILTERED
        scores = F.log_softmax(logits, dim=-1)  # [batch, beams, vocab]
        if self.scores is not None:
            scores = scores + self.scores[..., None]
        return scores.view(batch, beams * vocab)

    def step(self, logits: torch.Tensor, tokens: Tokens) -> tuple[Tokens, list[int]]:
        """logits [batch, beams, vocab] -> num_beams continuing beams per row."""
        batch, beams, vocab = logits.shape
        flat = self.joint_scores(logits, tokens)
        probs = F.softmax(flat, dim=-1)
        count = (max(1, len(self.end_tokens)) + 1) * self.num_beams
        if self.deterministic:
            candidates = torch.topk(probs, k=count, dim=-1).indices
        else:
            candidates = torch.multinomial(probs, num_samples=count, generator=self._rng.generator)
        candidate_scores = flat.gather(1, candidates)
        candidate_scores, order = torch.sort(candidate_scores, descending=True, dim=1)
        candidates = candidates.gather(1, order)
        parents, next_tokens = candidates // vocab, candidates % vocab

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
                    if self.ngram > 0:
                        bans = dict(row.bans[parent])
                        prefix = tuple(tokens[b][parent][-(self.ngram - 1):])
                        bans[prefix] = bans.get(prefix, ()) + (token,)
                        kept_bans.append(bans)
                else:
                    break
            row.bans = kept_bans if self.ngram > 0 else [{} for _ in kept]
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
        if not state.done and self.consider_end:
            for i, seq in enumerate(tokens[row]):
                self._add_end_beam(state, self.scores[row, i].item(), seq)
        state.done = True

    def finalize(self, tokens: Tokens) -> list[list[Beam]]:
        """Per row, the beams best first (finished ones if `consider_end`)."""
        out = []
        for b, row in enumerate(self.rows):
            if self.consider_end:
                if not row.done:
                    for i, seq in enumerate(tokens[b]):
                        self._add_end_beam(row, self.scores[b, i].item(), seq)
                    row.done = True
                out.append(list(row.end_beams))
            else:
                out.append([Beam(seq, None) for seq in tokens[b]])
        return out
