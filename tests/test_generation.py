"""GLM blank filling and the sampling strategies, against GLM-130B's own outputs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import glmc
import oracle
from conftest import SAT_TINY, TINY_SPECIAL, record_step_logits, sat_tiny_npz
from glmc.errors import GlmcError, PromptError
from glmc.generation.batch import Batch
from glmc.generation.filling import (
    BlankRequest,
    blank_attention_mask,
    blank_position_ids,
    generate,
    generate_blanks,
    prompt_from_ids,
    prompt_from_text,
)
from glmc.generation.strategies import FILTERED, BaseStrategy, BeamSearchStrategy, top_k_top_p_filter
from tolerances import assert_close

S = TINY_SPECIAL


@pytest.fixture(scope="module")
def sat_tiny():
    return glmc.load(SAT_TINY / "checkpoint", special_tokens=S)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return glmc.load(tiny_checkpoint)


def words(text: str) -> list[int]:
    """A stand-in tokenizer: whitespace-separated integers."""
    return [int(w) for w in text.split()]


# --- prompts, masks, positions --------------------------------------------------------------

@pytest.mark.parametrize("text,ids,mask,gmask,echo", [
    ("1 2 [MASK] 3", [1, 2, S.mask, 3, S.eos], S.mask, False, "1 2 [MASK] 3"),
    ("1 [sMASK] 2", [1, S.smask, 2, S.eos], S.smask, False, "1 [sMASK] 2"),
    ("1 2", [1, 2, S.gmask], S.gmask, True, "1 2 [gMASK]"),
    ("1 [gMASK]", [1, S.gmask], S.gmask, True, "1 [gMASK]"),
    ("1 [gMASK] 2", [1, S.gmask, 2, S.eos], S.gmask, True, "1 [gMASK] 2"),
    ("[MASK] 1 [gMASK] 2 [sMASK]", [S.mask, 1, S.gmask, 2, S.smask], S.mask, False, "[MASK] 1 [gMASK] 2 [sMASK]"),
])
def test_prompt_rules_of_generate_py(text, ids, mask, gmask, echo):
    prompt = prompt_from_text(text, words, S)
    assert (prompt.ids, prompt.mask_id, prompt.gmask, prompt.text) == (ids, mask, gmask, echo)


@pytest.mark.parametrize("given,ids,mask,gmask", [
    ([1, 2, S.mask, 3], [1, 2, S.mask, 3, S.eos], S.mask, False),
    ([1, 2], [1, 2, S.gmask], S.gmask, True),
    ([1, S.gmask], [1, S.gmask], S.gmask, True),
    ([1, S.gmask, 2], [1, S.gmask, 2, S.eos], S.gmask, True),
    ([1, S.mask, 2, S.eos], [1, S.mask, 2, S.eos], S.mask, False),
    ([S.smask, 1, S.gmask], [S.smask, 1, S.gmask], S.smask, False),
])
def test_prompt_rules_for_token_ids(given, ids, mask, gmask):
    prompt = prompt_from_ids(given, S)
    assert (prompt.ids, prompt.mask_id, prompt.gmask) == (ids, mask, gmask)


def test_masks_and_positions_of_generate_py():
    context = [5, 6, S.mask, 7, S.sop]
    request = BlankRequest(context, mask_position=2, gmask=False, max_new_tokens=3)
    assert blank_position_ids(request, 3) == [0, 1, 2, 3, 2, 2, 2, 2]
    gmask = BlankRequest(context, mask_position=2, gmask=True, max_new_tokens=3)
    assert blank_position_ids(gmask, 3) == list(range(8))
    assert np.array_equal(blank_attention_mask(5, 8).numpy(), oracle.glm_mask(8, 5)[0, 0])


# --- greedy generation against the original code --------------------------------------------

class _Recompute:
    """An executable without a cache: every step recomputes the whole sequence."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def prefill(self, tokens, position_ids, attention_mask, *, last_only=True, capacity=None):
        logits = self.model(tokens, position_ids, attention_mask, last_logits_only=last_only).logits
        return logits, (tokens, position_ids, attention_mask)

    @torch.no_grad()
    def decode(self, tokens, position_ids, attention_mask, cache):
        t, p, m = cache
        t, p = torch.cat([t, tokens], 1), torch.cat([p, position_ids], 1)
        n = t.shape[1]
        full = torch.ones(t.shape[0], 1, n, n, dtype=torch.bool)
        full[..., : n - 1, : n - 1] = m
        full[..., n - 1:, :] = attention_mask
        full[..., : n - 1, n - 1] = True
        return self.model(t, p, full, last_logits_only=True).logits, (t, p, full)

    def reorder_cache(self, cache, index):
        return tuple(c.index_select(0, index) for c in cache)


def test_cached_generation_equals_recomputation(sat_tiny, sat_tiny_cases):
    case = sat_tiny_cases["cases"]["gen_gmask"]
    golden = sat_tiny_npz("gen_gmask")
    strategy = BaseStrategy(top_k=1)
    seen = record_step_logits(strategy)
    request = BlankRequest(case["context"], case["mask_position"], True, 8)
    beams = generate_blanks(_Recompute(sat_tiny.executable.model), [request], strategy, S)
    assert beams[0][0].tokens[len(case["context"]):] == case["generated"]
    assert_close(torch.cat(seen, 1), golden["step_logits_nocache"], "float32", "recomputed step logits vs SAT")


def test_beam_search_with_and_without_cache_agree(tiny):
    request = BlankRequest([11, 12, 13, S.mask, 14, S.eos, S.sop], 3, False, 10)
    strategy = lambda: BeamSearchStrategy(4, 1.0, no_repeat_ngram_size=2)  # noqa: E731
    cached = generate_blanks(tiny.executable, [request], strategy(), S)
    recomputed = generate_blanks(_Recompute(tiny.executable.model), [request], strategy(), S)
    assert [b.tokens for b in cached[0]] == [b.tokens for b in recomputed[0]]
    assert np.allclose([b.score for b in cached[0]], [b.score for b in recomputed[0]], atol=1e-4)


# --- several masks, batches -----------------------------------------------------------------

def test_masks_are_filled_left_to_right(tiny):
    prompt = [21, 22, S.mask, 23, 24, S.mask, 25]
    result = tiny.generate(prompt, BaseStrategy(top_k=1), out_seq_length=30)
    first, second = result.blank_ids[0]
    # Step by step, as generate.py does: fill the first mask, then the second in the filled text.
    seq = prompt + [S.eos]
    one = generate_blanks(tiny.executable, [BlankRequest(seq + [S.sop], 2, False, 30 - len(seq) - 1)],
                          BaseStrategy(top_k=1), S)[0][0].tokens[len(seq) + 1:]
    one = one[:-1] if one and one[-1] in S.end_tokens else one
    seq = seq[:2] + one + seq[3:]
    two = generate_blanks(tiny.executable, [BlankRequest(seq + [S.sop], seq.index(S.mask), False,
                                                         30 - len(seq) - 1)],
                          BaseStrategy(top_k=1), S)[0][0].tokens[len(seq) + 1:]
    two = two[:-1] if two and two[-1] in S.end_tokens else two
    assert (first, second) == (one, two)
    assert result.token_ids[0] == [21, 22] + one + [23, 24] + two + [25]


PROMPTS = [[31, 32, 33, 34, 35, 36, 37], [41, S.mask, 42], [51, 52, S.smask, 53, 54, 55], [61, 62, 63, S.gmask]]


@pytest.mark.parametrize("make", [lambda: BaseStrategy(top_k=1),
                                  lambda: BeamSearchStrategy(3, 0.8, no_repeat_ngram_size=2, min_gen_length=2),
                                  lambda: BaseStrategy(1.3, 0, 0.95, seed=5),
                                  lambda: BeamSearchStrategy(3, 0.8, deterministic=False, seed=11)],
                         ids=["greedy", "beam", "sampling", "beam-sampling"])
def test_batched_prompts_equal_single_prompts(tiny, make):
    # Sampling too: each row draws from its own generator, seeded as its prompt alone would be.
    batched = tiny.generate(PROMPTS, make(), out_seq_length=24)
    for prompt, together in zip(PROMPTS, batched):
        alone = tiny.generate(prompt, make(), out_seq_length=24)
        assert together.token_ids == alone.token_ids
        assert np.allclose([s or 0 for s in together.scores], [s or 0 for s in alone.scores], atol=1e-4)


def test_one_strategy_serves_concurrent_generations(tiny_checkpoint):
    # A strategy holds only parameters; each generation keeps its own state. Models serialise calls.
    import threading

    model = glmc.load(tiny_checkpoint)
    strategies = [BaseStrategy(1.2, 0, 0.9, seed=3), BeamSearchStrategy(3, 1.0, no_repeat_ngram_size=2)]
    expected = {(i, j): model.generate(prompt, strategy, out_seq_length=24).token_ids
                for i, prompt in enumerate(PROMPTS) for j, strategy in enumerate(strategies)}
    results, errors = {}, []

    def work(i, j):
        try:
            for _ in range(2):
                results[i, j] = model.generate(PROMPTS[i], strategies[j], out_seq_length=24).token_ids
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=work, args=key) for key in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and results == expected


def _sat_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """SAT's top-p filter as written there: sort the whole row, cumulative softmax, keep up to the crossing."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.scatter(-1, sorted_indices, sorted_logits.masked_fill(remove, FILTERED))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.7, 0.95, 0.9999, 1.0])
@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])  # flat rows need thousands of candidates, peaked ones a few
def test_top_p_without_a_full_sort_keeps_what_sat_keeps(top_p, scale):
    generator = torch.Generator().manual_seed(int(top_p * 1000 + scale * 10))
    logits = torch.randn(3, 20000, generator=generator) * scale
    assert torch.equal(top_k_top_p_filter(logits.clone(), top_p=top_p), _sat_top_p(logits, top_p))


def test_non_finite_logits_are_one_error_not_a_crash():
    logits = torch.zeros(1, 1, 50)
    logits[0, 0, 3] = float("nan")
    for strategy in (BaseStrategy(), BeamSearchStrategy(2)):
        with pytest.raises(glmc.errors.GlmcError, match="non-finite logits"):
            strategy.start(1, S.end_tokens).step(logits.clone(), [[[1]] * strategy.num_beams])


def _input(prompt: list[int], out_seq_length: int):
    built = prompt_from_ids(prompt, S)
    context = built.ids + [S.sop]
    return BlankRequest(context, context.index(built.mask_id), built.gmask, out_seq_length - len(context)
                        ).generation_input()


JOINS = [lambda: BaseStrategy(top_k=1), lambda: BaseStrategy(1.2, 0, 0.9, seed=3),
         lambda: BeamSearchStrategy(3, 1.0, no_repeat_ngram_size=2)]


@pytest.mark.parametrize("make", JOINS, ids=["greedy", "sampling", "beam"])
@pytest.mark.parametrize("source", ["torch", "onnxruntime", "onnxruntime-unfused"])
def test_generations_joining_a_running_batch_get_what_they_get_alone(tiny_checkpoint, tiny_package,
                                                                      tiny_package_unfused, source, make):
    """Continuous batching: generations join a batch between its steps (their caches merged into
    the batch's, the shorter side left-padded) and leave when done; each gets what it gets alone.
    On the torch backend's static cache, ONNX Runtime's in-place one and a concatenated one."""
    path = {"torch": tiny_checkpoint, "onnxruntime": tiny_package, "onnxruntime-unfused": tiny_package_unfused}[source]
    executable = glmc.load(path, backend=source.split("-")[0]).executable
    first = _input([11, 12, S.mask, 13], 30)
    later = [_input([21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, S.gmask], 40),  # longer than the batch
             _input([41, S.mask], 30)]                                                       # shorter
    alone = [generate(executable, [i], make(), S)[0] for i in [first, *later]]
    batch = Batch(executable, S)
    strategy = make()
    groups = batch.join([first], strategy, [strategy.generator()])
    for _ in range(4):
        batch.step()
    assert batch.groups and batch.length == len(first.tokens) + 4  # still running: the join merges caches
    groups += batch.join(later, strategy, [strategy.generator() for _ in later])
    assert batch.length == len(later[0].tokens)  # the batch was left-padded to the longer newcomer
    while batch.groups:
        batch.step()
    for group, expected in zip(groups, alone):
        assert [b.tokens for b in group.result] == [b.tokens for b in expected]


@pytest.mark.parametrize("source", ["torch", "onnxruntime", "onnxruntime-unfused", "torch-tp2"])
def test_the_next_join_drops_the_positions_of_generations_that_left(tiny_checkpoint, tiny_package,
                                                                     tiny_package_unfused, source):
    """A long prompt leaves the batch early: the next join drops the cache positions only it
    used, so the cache stays as long as the longest live row (a server's batch that never
    empties would otherwise grow to the model's limit), and every generation still gets what
    it gets alone."""
    path = {"onnxruntime": tiny_package, "onnxruntime-unfused": tiny_package_unfused}.get(source, tiny_checkpoint)
    model = glmc.load(path, backend=source.split("-")[0], tp_size=2 if source.endswith("tp2") else 1)
    with model:  # at TP 2 the joins go to rank 1 through the command stream
        _drop_dead_positions(model.executable)


def _drop_dead_positions(executable) -> None:
    make = JOINS[1]
    long = _input([21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, S.gmask], 18)  # three tokens, then gone
    short, newcomer = _input([11, 12, S.mask, 13], 30), _input([41, S.mask], 30)
    alone = [generate(executable, [i], make(), S)[0] for i in (long, short, newcomer)]
    batch, strategy = Batch(executable, S), make()
    groups = batch.join([long, short], strategy, [strategy.generator() for _ in range(2)])
    while groups[0] in batch.groups:
        batch.step()
    assert batch.groups == [groups[1]]
    dead = len(long.tokens) - len(short.tokens)
    assert batch.dead_columns == dead and batch.live_length == batch.length - dead
    expected = batch.length - dead + 1  # the newcomer joins before the step's decode adds a column
    groups += batch.join([newcomer], strategy, [strategy.generator()])
    batch.step()
    assert batch.length == expected and batch.dead_columns == 0
    while batch.groups:
        batch.step()
    for group, expected in zip(groups, alone):
        assert [b.tokens for b in group.result] == [b.tokens for b in expected]


class _ThreadNoting(BaseStrategy):
    """BaseStrategy whose generations note the threads they draw on."""

    def __init__(self, threads: set, **options):
        super().__init__(**options)
        self.threads = threads

    def start(self, batch_size, end_tokens, generators=None):
        run, threads = super().start(batch_size, end_tokens, generators), self.threads
        step = run.step

        def noting_step(logits, tokens):
            threads.add(threading.current_thread().name)
            return step(logits, tokens)

        run.step = noting_step
        return run


def _run_batch(executable, inputs, strategies, generators, sampling_threads):
    batch = Batch(executable, S, sampling_threads=sampling_threads)
    groups = batch.join(inputs, strategies, generators)
    while batch.groups:
        batch.step()
    return [[b.tokens for b in g.result] for g in groups]


def test_generations_draw_in_parallel_and_each_gets_what_it_gets_alone(tiny_checkpoint):
    """On several cores the generations of a batch draw at once (a large vocabulary's sort and
    draw is most of a many-row step); each draws from its own generator, exactly as alone.
    Generations sharing a generator draw in turn, in the batch's order."""
    executable = glmc.load(tiny_checkpoint, backend="torch").executable
    inputs = [_input([11, 12, S.mask, 13], 24), _input([41, S.mask], 24), _input([21, 22, 23, S.gmask], 24),
              _input([31, S.mask, 32], 24)]
    threads: set = set()
    strategies = [_ThreadNoting(threads, temperature=1.3, top_p=0.95, seed=seed) for seed in range(4)]
    alone = [_run_batch(executable, [i], [s], [s.generator()], 1)[0] for i, s in zip(inputs, strategies)]
    threads.clear()
    together = _run_batch(executable, inputs, strategies, [s.generator() for s in strategies], 4)
    assert together == alone
    assert len(threads - {threading.current_thread().name}) > 1  # they drew on several workers

    threads.clear()
    shared = [torch.Generator().manual_seed(7)] * 4
    in_turn = _run_batch(executable, inputs, strategies, shared, 1)
    shared = [torch.Generator().manual_seed(7)] * 4
    assert _run_batch(executable, inputs, strategies, shared, 4) == in_turn
    assert threads == {threading.current_thread().name}


def test_a_generation_whose_own_draw_fails_leaves_and_the_others_go_on(tiny_checkpoint):
    """A temperature so small that logits / temperature overflows fails that generation alone,
    with one line; in `generate` (glmc run) it is an error."""
    executable = glmc.load(tiny_checkpoint, backend="torch").executable
    good, bad = BaseStrategy(1.2, 0, 0.9, seed=3), BaseStrategy(1e-45, 0, 0.9, seed=3)
    first, second = _input([11, 12, S.mask, 13], 30), _input([41, S.mask], 30)
    alone = generate(executable, [first], good, S)[0]
    batch = Batch(executable, S)
    groups = batch.join([first, second], [good, bad], [good.generator(), bad.generator()])
    finished = batch.step()
    assert finished == [groups[1]] and groups[1].result == []
    assert groups[1].error.startswith("temperature 1e-45 is too small for float32 logits")
    while batch.groups:
        batch.step()
    assert [b.tokens for b in groups[0].result] == [b.tokens for b in alone]
    with pytest.raises(GlmcError, match="temperature 1e-45 is too small"):
        generate(executable, [second], bad, S)


def test_sampling_is_seeded(tiny):
    runs = [tiny.generate([1, 2, 3], BaseStrategy(0.9, 0, 0.9, seed=s), out_seq_length=20).token_ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_too_long_prompts_and_no_room(tiny):
    with pytest.raises(PromptError, match="prompt 1 is 129 tokens long; the model takes at most 128"):
        tiny.generate([5] * 128, BaseStrategy(top_k=1), out_seq_length=128)
    with pytest.raises(PromptError, match="leaves no room to generate"):
        tiny.generate([5] * 10, BaseStrategy(top_k=1), out_seq_length=12)
    with pytest.raises(PromptError, match="exceeds the model's maximum sequence length 128"):
        tiny.generate([5] * 10, BaseStrategy(top_k=1), out_seq_length=200)


# --- strategies on hand-computed cases ------------------------------------------------------

def test_top_k_and_top_p_filters():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert top_k_top_p_filter(logits.clone(), top_k=2).tolist() == [[FILTERED, 4.0, 3.0, FILTERED]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # cumulative 0.5, 0.8, 0.95, 1.0: tokens past 0.6 go, except the one that crosses it
    kept = top_k_top_p_filter(probs.log(), top_p=0.6)
    assert (kept[0] > FILTERED).tolist() == [True, True, False, False]


def test_base_strategy_ends_rows_and_pads_with_minus_one():
    run = BaseStrategy(top_k=1).start(2, S.end_tokens)
    logits = torch.full((2, 1, 1024), -5.0)
    logits[0, 0, S.eos] = 5.0
    logits[1, 0, 7] = 5.0
    tokens, parents = run.step(logits, [[[1]], [[2]]])
    assert tokens == [[[1, S.eos]], [[2, 7]]] and parents == [0, 1] and run.done == [True, False]
    tokens, _ = run.step(logits, tokens)
    assert tokens == [[[1, S.eos, -1]], [[2, 7, 7]]]


@pytest.mark.parametrize("make", [lambda: BaseStrategy(1.1, 0, 0.9, seed=9),
                                  lambda: BeamSearchStrategy(2, deterministic=False, seed=9)], ids=["sampling", "beam"])
def test_each_row_draws_from_its_own_generator(make):
    # Row r of one run draws exactly what a run of that row alone draws with generator r.
    logits = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(0)) * 3
    tokens = [[[1]], [[2]], [[3]]]
    together = make().start(3, S.end_tokens, [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    picked = together.step(logits.clone(), tokens)[0]
    for row, seed in enumerate((5, 6, 7)):
        alone = make().start(1, S.end_tokens, [torch.Generator().manual_seed(seed)])
        assert alone.step(logits[row:row + 1].clone(), [tokens[row]])[0] == [picked[row]]


def test_min_gen_length_holds_end_tokens_back():
    run = BaseStrategy(top_k=1, min_gen_length=1).start(1, S.end_tokens)
    logits = torch.zeros(1, 1, 1024)
    logits[0, 0, S.eop] = 9.0
    logits[0, 0, 4] = 1.0
    assert run.step(logits, [[[1]]])[0] == [[[1, 4]]]
    assert run.step(logits, [[[1, 4]]])[0] == [[[1, 4, S.eop]]]


def test_beam_search_length_penalty_and_end_beams():
    strategy = BeamSearchStrategy(2, length_penalty=2.0).start(1, S.end_tokens)
    logp = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    logits = torch.full((1, 1, 1024), -1e9)
    logits[0, 0, [S.eos, 3, 4]] = logp
    tokens, parents = strategy.step(logits, [[[9, 9]]])
    # eos is the best candidate: it ends a beam scored log(0.5) / ((5 + 3) / 6) ** 2 (length counts the context).
    end = strategy.rows[0].end_beams
    assert len(end) == 1 and end[0].tokens == [9, 9, S.eos]
    assert end[0].score == pytest.approx(float(np.log(0.5)) / (8 / 6) ** 2, rel=1e-6)
    assert tokens == [[[9, 9, 3], [9, 9, 4]]] and parents == [0, 0]
    finished = strategy.finalize(tokens)[0]
    assert [b.tokens for b in finished] == [[9, 9, S.eos], [9, 9, 3]]  # top 2 of 3, best first


def test_beam_search_bans_repeated_ngrams():
    strategy = BeamSearchStrategy(1, no_repeat_ngram_size=2).start(1, S.end_tokens)
    logits = torch.zeros(1, 1, 30)
    logits[0, 0, 5] = 3.0
    logits[0, 0, 6] = 2.0
    tokens = [[[5]]]
    for _ in range(3):
        tokens, _ = strategy.step(logits, tokens)
    # Bans apply only once the sequence is longer than n (GLM-130B's `seq_len > ngram`),
    # so (5, 5) repeats once more before the ban keyed on the last token (5,) turns it to 6.
    assert tokens[0][0] == [5, 5, 5, 6]


def _beam_logits(rows: list[dict[int, float]]) -> torch.Tensor:
    """[1, beams, 1024] logits holding the given log-probabilities (the rest ~ impossible)."""
    logits = torch.full((1, len(rows), 1024), -1e4)
    for i, row in enumerate(rows):
        for token, logp in row.items():
            logits[0, i, token] = logp
    return logits


def test_beam_candidates_reach_past_the_end_tokens():
    # Two beams whose two best tokens are both end tokens: the 4 best candidates all end,
    # so continuing beams come from the 5th and 6th of (2 end tokens + 1) * 2 candidates.
    strategy = BeamSearchStrategy(2).start(1, S.end_tokens)
    strategy.scores = torch.tensor([[0.0, -0.1]])
    logits = _beam_logits([{S.eos: -0.1, S.eop: -0.2, 7: -3.0}, {S.eos: -0.1, S.eop: -0.2, 8: -3.0}])
    tokens, parents = strategy.step(logits, [[[1, 2], [1, 3]]])
    assert tokens == [[[1, 2, 7], [1, 3, 8]]] and parents == [0, 1]
    assert len(strategy.rows[0].end_beams) == 2  # the best two of the four finished beams


def test_the_scan_stops_at_the_first_continuing_candidate_too_many():
    # Candidates in order: 5, 6 (continue), eop (ends: still scanned), 7 (a third continuing
    # beam: the scan stops), eos (never reached, so it never becomes an end beam).
    strategy = BeamSearchStrategy(2).start(1, S.end_tokens)
    logits = _beam_logits([{5: -0.1, 6: -0.2, S.eop: -0.25, 7: -0.3, S.eos: -0.35}])
    tokens, _ = strategy.step(logits, [[[1]]])
    assert tokens == [[[1, 5], [1, 6]]]
    assert [b.tokens for b in strategy.rows[0].end_beams] == [[1, S.eop]]


def test_equal_end_scores_put_the_newer_beam_first():
    strategy = BeamSearchStrategy(3, length_penalty=0.0).start(1, S.end_tokens)
    strategy._add_end_beam(strategy.rows[0], -1.0, [1, 2])
    strategy._add_end_beam(strategy.rows[0], -1.0, [3, 4])
    assert [b.tokens for b in strategy.rows[0].end_beams] == [[3, 4], [1, 2]]
