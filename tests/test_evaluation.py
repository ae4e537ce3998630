"""`glmc evaluate`: GLM-130B's samples, metrics and scores, checked independently.

Scores on glm-tiny are recomputed here from the reference model alone: each choice
scored on its own sequence (no block attention, no batching), generation by full
recomputation without a cache, language-model windows derived from the token index
rather than the window index.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SPECIAL as S
from hypothesis import given, settings
from hypothesis import strategies as st

import glmc
from glmc.errors import GlmcError
from glmc.evaluation import (
    METRICS,
    GenerationTaskConfig,
    MultiChoiceTaskConfig,
    TaskConfigError,
    TaskType,
    find_task_files,
    fit_to_model,
    read_task,
    register_metric,
)
from glmc.evaluation import metrics as M
from glmc.evaluation.samples import (
    generation_sample,
    language_model_sample,
    language_model_windows,
    multiple_choice_sample,
    pad_batch,
)
from glmc.tokenizer import IceTokenizer
from glmc.tokenizer.train import corpus_lines, train_ice_text_model

REPO = Path(__file__).parent.parent
M_, G_, SOP = S.mask, S.gmask, S.sop


# --- samples, by hand ------------------------------------------------------------------------

def test_multiple_choice_sample_block_attention():
    s = multiple_choice_sample([5, 6, 7], [[8, 9], [10]], S, is_single_token=False)
    assert s.tokens.tolist() == [5, 6, 7, M_, SOP, 8, SOP]
    assert s.position_ids.tolist() == [0, 1, 2, 3, 3, 3, 3]  # every choice sits at the mask's position
    assert [t.tolist() for t in s.choice_target_ids] == [[4, 5], [6]]
    expected = np.array([
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],  # choice 0: the context, then causal
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0, 1],  # choice 1 never sees choice 0
    ])
    assert np.array_equal(s.attention_mask, expected)


def test_multiple_choice_single_token_shortcut_and_task_mask():
    s = multiple_choice_sample([5, 6, 7], [[8], [9], [10]], S, is_single_token=True)
    assert s.tokens.tolist() == [5, 6, 7, M_, SOP]  # one sop scores every choice
    assert s.position_ids.tolist() == [0, 1, 2, 3, 3]
    assert [t.tolist() for t in s.choice_target_ids] == [[4]]
    g = multiple_choice_sample([5, 6, 7], [[8, 9], [10]], S, is_single_token=False, use_task_mask=True)
    assert g.tokens.tolist() == [5, 6, 7, G_, SOP, 8, SOP]
    assert g.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 4]  # [gMASK]: each choice counts on from the context
    blank = multiple_choice_sample([5, M_, 7], [[8, 9]], S, is_single_token=False)
    assert blank.tokens.tolist() == [5, M_, 7, SOP, 8]  # the mask in the text is the blank
    assert blank.position_ids.tolist() == [0, 1, 2, 1, 1]


def test_generation_samples():
    s = generation_sample([5, 6, 7], 3, S, use_task_mask=False, unidirectional=False)
    assert s.tokens.tolist() == [5, 6, 7, M_, SOP]
    assert s.position_ids.tolist() == [0, 1, 2, 3, 3] and s.target_position_ids.tolist() == [3, 3, 3]
    assert np.array_equal(s.attention_mask, np.array([[1, 1, 1, 1, 0]] * 4 + [[1, 1, 1, 1, 1]]))
    u = generation_sample([5, 6, 7], 3, S, use_task_mask=True, unidirectional=True)
    assert u.tokens.tolist() == [G_, SOP, 5, 6, 7]
    assert u.position_ids.tolist() == [0, 1, 2, 3, 4] and u.target_position_ids.tolist() == [5, 6, 7]
    assert np.array_equal(u.attention_mask, np.tril(np.ones((5, 5), dtype=np.int64)))
    b = generation_sample([5, M_, 7], 2, S, use_task_mask=False, unidirectional=False)
    assert b.tokens.tolist() == [5, M_, 7, SOP]
    assert b.position_ids.tolist() == [0, 1, 2, 1] and b.target_position_ids.tolist() == [1, 1]


def test_language_model_windows_by_hand():
    doc = list(range(100, 110))  # d0..d9
    assert language_model_windows(10, 6, 2) == 4
    w0 = language_model_sample(doc, 0, S, max_seq_length=6, generation_length=2, use_task_mask=True,
                               unidirectional=False)
    assert w0.tokens.tolist() == [G_, SOP, 100, 101, 102, 103]
    assert w0.targets.tolist() == [G_, 100, 101, 102, 103, 104]
    assert w0.loss_mask.tolist() == [0, 1, 1, 1, 1, 1]
    w1 = language_model_sample(doc, 1, S, max_seq_length=6, generation_length=2, use_task_mask=True,
                               unidirectional=False)
    assert w1.tokens.tolist() == [102, 103, 104, G_, SOP, 105]  # 3 tokens of prompt, 2 scored
    assert w1.targets.tolist() == [102, 103, 104, G_, 105, 106]
    assert w1.loss_mask.tolist() == [0, 0, 0, 0, 1, 1]
    assert w1.attention_mask[:4, :4].all() and not w1.attention_mask[3, 4]  # the prompt is bidirectional


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 60), max_seq_length=st.integers(4, 20), data=st.data())
def test_language_model_windows_score_every_token_once(length, max_seq_length, data):
    generation_length = data.draw(st.integers(1, max_seq_length - 1))
    doc = list(range(1000, 1000 + length))
    scored = []
    for w in range(language_model_windows(length, max_seq_length, generation_length)):
        s = language_model_sample(doc, w, S, max_seq_length=max_seq_length, generation_length=generation_length,
                                  use_task_mask=True, unidirectional=False)
        assert len(s.tokens) <= max_seq_length
        targets = s.targets[s.loss_mask == 1].tolist()
        first = doc.index(targets[0])
        prompt = s.tokens.tolist()[: s.tokens.tolist().index(G_)]
        assert prompt == doc[first - len(prompt):first]  # the prompt is what comes right before
        scored += targets
    assert scored == doc


def test_pad_batch_rounds_to_32_and_hides_padding():
    a = generation_sample([5, 6, 7], 3, S, use_task_mask=False, unidirectional=False)
    b = generation_sample(list(range(40)), 3, S, use_task_mask=False, unidirectional=False)
    tokens, positions, mask = pad_batch([a, b])
    assert tokens.shape == (2, 64) and mask.shape == (2, 1, 64, 64)
    assert mask[0, 0, :5, 5:].all()  # real tokens never see padding
    assert not mask[0, 0, 5:, 0].any()  # padding rows see one key (no empty softmax)


# --- metrics, by hand -----------------------------------------------------------------------

def test_qa_metrics_normalise_punctuation_and_articles():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.normalize_answer("An apple a day") == "apple day"
    assert M.exact_match_score("the Mat.", "mat") == 1.0
    assert M.f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)  # p 2/2, r 2/3
    assert M.f1_score("dog", "cat") == 0.0
    examples = [{"targets_text": ["Paris", "paris, France"]}, {"targets_text": ["blue sky"]}, {"targets_text": []}]
    assert M.qa_exact_match(["paris", "the sky", "x"], examples) == pytest.approx(100 / 3)
    # best target per example: f1("france", "paris france") = 2 * 1 * 0.5 / 1.5 (over 0 for "paris"),
    # f1("sky", "blue sky") the same, no target: 0
    assert M.qa_f1(["france", "the sky", "x"], examples) == pytest.approx(100 * (2 / 3 + 2 / 3) / 3)


def test_choice_metrics_and_perplexity():
    examples = [{"label": 0}, {"label": 1}, {"label": 2}, {"label": 1}]
    predictions = [0, 1, 1, 0]
    assert M.accuracy(predictions, examples) == 50.0
    # micro averaging over labels: 2 true positives, 2 false positives, 2 false negatives
    assert M.micro_f1(predictions, examples) == M.micro_precision(predictions, examples) == 50.0
    assert M.micro_recall(predictions, examples) == 50.0
    assert M.perplexity([3.0, 1.0], [{"num_original_tokens": 2}]) == pytest.approx(math.exp(2.0))
    assert M.perplexity([100.0], [{"num_original_tokens": 1}]) == pytest.approx(math.exp(20.0))  # capped


def test_registered_metric_is_found_and_unknown_metric_is_one_line(tmp_path):
    @register_metric("Twice")
    def twice(predictions, examples):
        return 2.0 * len(predictions)

    try:
        assert M.get_metric("Twice") is twice
        with pytest.raises(GlmcError, match="unknown metric 'Nope'"):
            M.get_metric("Nope", "t.yaml")
    finally:
        del METRICS["Twice"]


# --- task files -------------------------------------------------------------------------------

def _yaml(tmp_path: Path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_fields_dash_or_underscore_and_unknown_fields_reported(tmp_path):
    loaded = read_task(_yaml(tmp_path, "name: t\ntype: gen\npath: p\nmicro-batch-size: 3\nmax_gen_length: 7\n"
                                       "sampling-strategy: BeamSearchStrategy\nnum_beams: 2\ncolour: red\n"
                                       "file-pattern:\n  dev: '**/dev.jsonl'\n  test: '**/test.jsonl'\n"))
    c = loaded.config
    assert isinstance(c, GenerationTaskConfig)
    assert (c.micro_batch_size, c.max_gen_length, c.sampling_strategy, c.num_beams) == (3, 7, "BeamSearchStrategy", 2)
    assert c.file_pattern == {"dev": "**/dev.jsonl", "test": "**/test.jsonl"}
    assert c.metrics == ("EM", "F1")
    assert loaded.notes == [f"{tmp_path / 'task.yaml'}: unknown field 'colour' ignored"]


@pytest.mark.parametrize("text, message", [
    ("name: t\ntype: mul\npath: p\nmicro-batch-size: 2\nmicro_batch_size: 3\n", "given twice"),
    ("name: t\ntype: quiz\npath: p\n", "unknown task type 'quiz'"),
    ("name: t\ntype: mul\n", "'path' is missing"),
    ("name: t\ntype: mul\npath: p\nmicro-batch-size: many\n", "'micro_batch_size' must be an integer"),
    ("name: t\ntype: mul\npath: p\nunidirectional: true\n", "needs use_task_mask"),
    ("name: t\ntype: mul\n\tpath: p\n", "not valid YAML (line 3"),
    ("- a\n- b\n", "must be a mapping"),
    ("name: t\ntype: other\npath: p\n", "needs a 'module'"),
    ("name: t\ntype: mul\npath: p\nmodule: nowhere.Task\n", "module 'nowhere' cannot be imported"),
])
def test_bad_task_files_are_one_clear_error(tmp_path, text, message):
    path = _yaml(tmp_path, text)
    with pytest.raises(TaskConfigError) as error:
        read_task(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_shipped_task_files_parse_without_unknown_fields():
    files = find_task_files([REPO / "tasks"])
    names = {f.relative_to(REPO / "tasks").as_posix() for f in files}
    for expected in ("bloom/glue_cola.yaml", "bloom/glue_mnli.yaml", "chinese/clue/afqmc.yaml",
                     "chinese/fewclue/bustm.yaml", "language-modeling/wikitext-103.yaml",
                     "language-modeling/ptb.yaml", "demo/fortune-choice.yaml"):
        assert expected in names, expected
    for path in files:
        loaded = read_task(path)
        assert loaded.notes == [], loaded.notes
        assert loaded.config.module is None


def test_length_is_fitted_to_the_model(tmp_path):
    loaded = read_task(_yaml(tmp_path, "name: t\ntype: mul\npath: p\nmax_seq_length: 1024\n"))
    fit_to_model(loaded, 128)
    assert loaded.config.max_seq_length == 128 and "exceeds the model's 128" in loaded.notes[0]
    lm = read_task(_yaml(tmp_path, "name: t\ntype: lm\npath: p\ngeneration_length: 256\n", "lm.yaml"))
    with pytest.raises(TaskConfigError, match="maximum sequence length 128.*generation_length"):
        fit_to_model(lm, 128)


# --- scores on glm-tiny, recomputed independently --------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A 600-piece SentencePiece model in icetk's layout, ids below glm-tiny's commands (1000)."""
    text = (REPO / "data" / "corpus" / "en.txt").read_text(encoding="utf-8")[:200_000]
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    path.write_bytes(train_ice_text_model(corpus_lines([text]), 600))
    return IceTokenizer(path, text_offset=0, command_base=S.mask)


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def backend_model(request, tiny_checkpoint, tiny_package, tiny_tokenizer):
    """(backend, glm-tiny on it with the tiny tokenizer)."""
    source = tiny_checkpoint if request.param == "torch" else tiny_package
    with glmc.load(source, backend=request.param, threads=1) as model:
        model.tokenizer = tiny_tokenizer
        yield request.param, model


TOLERANCE = {"torch": 1e-5, "onnxruntime": 2e-4}  # of the score's magnitude (fp32; ORT fuses and reorders)


@torch.no_grad()
def _reference_logits(reference, tokens, positions, visible) -> torch.Tensor:
    mask = ~torch.as_tensor(visible, dtype=torch.bool)[None, None]
    return reference(torch.tensor([tokens]), torch.tensor([positions]), mask).logits[0].double()


def _prefix_visible(n: int, prefix: int) -> np.ndarray:
    """Causal, plus the first `prefix` columns visible to every row."""
    visible = np.tril(np.ones((n, n), dtype=bool))
    visible[:, :prefix] = True
    return visible


def _write(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")


def _run_task(model, yaml_text: str, tmp_path: Path):
    loaded = read_task(_yaml(tmp_path, yaml_text))
    fit_to_model(loaded, model.config.max_sequence_length)
    return loaded.task_class(model, loaded.config, tmp_path / "data", source="t.yaml").evaluate()


MC_ITEMS = [
    {"inputs_pretokenized": "The early bird catches the", "choices_pretokenized": ["worm", "cat sat down", "sky"],
     "label": 0},
    {"inputs": [11, 12, 13, 14, 15], "choices": [[21, 22], [23], [24, 25, 26]], "label": 2},
    {"inputs": [31, M_, 33, 34], "choices": [[41], [42, 43]], "label": 1},  # blank filling
    {"inputs": list(range(100, 260)), "choices": [[5], [6, 7]], "label": 0},  # truncated to the model's 128
    {"inputs": [71, 72, 73], "choices": [[81], [82], [83], [84]], "label": 3},  # single tokens: one sop
]
MC_FILES = {"a/test.jsonl": MC_ITEMS[:2], "b/test.jsonl": MC_ITEMS[2:4], "c/test.jsonl": MC_ITEMS[4:]}


def _choice_scores_alone(reference, text, choices, use_task_mask):
    """Each choice on its own sequence: context + mask, then sop and the choice, causal."""
    mask_id = G_ if use_task_mask else M_
    if mask_id in text:
        context, mask_position = list(text), text.index(mask_id)
    else:
        context, mask_position = list(text) + [mask_id], len(text)
    scores = []
    for choice in choices:
        tokens = context + [SOP] + choice[:-1]
        positions = list(range(len(context)))
        positions += (list(range(len(context), len(context) + len(choice))) if use_task_mask
                      else [mask_position] * len(choice))
        logits = _reference_logits(reference, tokens, positions, _prefix_visible(len(tokens), len(context)))
        log_probs = F.log_softmax(logits, dim=-1)
        scores.append(sum(float(log_probs[len(context) + j, c]) for j, c in enumerate(choice)))
    return scores


@pytest.mark.parametrize("use_task_mask", [False, True])
def test_multiple_choice_accuracy_equals_independent_scores(backend_model, tiny_model, tiny_tokenizer, tmp_path,
                                                            use_task_mask):
    backend, model = backend_model
    for name, items in MC_FILES.items():
        _write(tmp_path / "data" / "mc" / name, items)
    result = _run_task(model, f"name: mc\ntype: mul\npath: mc\nmicro-batch-size: 3\nuse_task_mask: {use_task_mask}\n"
                              "file-pattern:\n  test: '**/test.jsonl'\n", tmp_path)
    accuracies = []
    for items in MC_FILES.values():
        correct = []
        for item in items:
            text = item.get("inputs") or tiny_tokenizer.tokenize(item["inputs_pretokenized"])
            choices = item.get("choices") or [tiny_tokenizer.tokenize(c) for c in item["choices_pretokenized"]]
            keep = 128 - sum(len(c) for c in choices) - 2
            scores = _choice_scores_alone(tiny_model, text[-keep:], choices, use_task_mask)
            ranked = sorted(scores, reverse=True)
            assert ranked[0] - ranked[1] > 1e-3, "a near tie would make the comparison fragile"
            correct.append(int(np.argmax(scores)) == item["label"])
        accuracies.append(100.0 * np.mean(correct))
    files = result.groups["test"]
    assert [f.file for f in files] == list(MC_FILES)
    assert [f.metrics["Accuracy"] for f in files] == pytest.approx(accuracies)
    summary = result.summary("test")["Accuracy"]
    weights = [len(items) for items in MC_FILES.values()]
    assert summary["average"] == pytest.approx(np.average(accuracies, weights=weights))
    assert summary["median"] == pytest.approx(np.median(accuracies)) and summary["max"] == max(accuracies)


def test_choice_log_probs_equal_independent_scores(backend_model, tiny_model, tmp_path):
    from glmc.evaluation.datasets import MultiChoiceDataset, Vocabulary
    from glmc.evaluation.scoring import choice_log_probs

    backend, model = backend_model
    for name, items in MC_FILES.items():
        _write(tmp_path / name, [i for i in items if "inputs" in i])
        config = MultiChoiceTaskConfig(name="t", type=TaskType.MULTICHOICE, path=".", max_seq_length=128)
        dataset = MultiChoiceDataset(tmp_path / name, config, Vocabulary(S, 1024, None, None))
        batched = choice_log_probs(model, [dataset.sample(i) for i in range(len(dataset))])
        for index, scores in enumerate(batched):
            item = dataset.data[index]
            expected = _choice_scores_alone(tiny_model, item["text"], item["choices"], False)
            assert np.allclose(scores, expected, rtol=0, atol=TOLERANCE[backend] * max(map(abs, expected))), name


def _greedy_alone(reference, text, max_gen_length):
    """Greedy [MASK] generation by recomputing the whole sequence at every step, no cache."""
    context = list(text) + [M_, SOP]
    generated = []
    for _ in range(max_gen_length):
        tokens = context + generated
        positions = list(range(len(context) - 1)) + [len(text)] * (1 + len(generated))
        logits = _reference_logits(reference, tokens, positions, _prefix_visible(len(tokens), len(context) - 1))
        token = int(logits[-1].argmax())
        if token in S.end_tokens:
            break
        generated.append(token)
    return generated


def test_generation_scores_equal_independent_greedy_generation(backend_model, tiny_model, tiny_tokenizer,
                                                               tmp_path):
    backend, model = backend_model
    items = [
        {"inputs_pretokenized": "A friend in need is a friend", "targets_pretokenized": ["indeed"]},
        {"inputs": [50, 51, 52, 53], "targets": [[60, 61], [62]]},
        {"inputs_pretokenized": "Love is", "targets_pretokenized": ["blind", "patient"]},
    ]
    _write(tmp_path / "data" / "gen" / "test.jsonl", items)
    generated = []
    for item in items:
        text = item.get("inputs") or tiny_tokenizer.tokenize(item["inputs_pretokenized"])
        generated.append(_greedy_alone(tiny_model, text, 6))
    # A target the model actually produces makes EM and F1 non-trivial.
    items[1]["targets"] = [generated[1], [62]]
    _write(tmp_path / "data" / "gen" / "test.jsonl", items)
    result = _run_task(model, "name: g\ntype: gen\npath: gen\nmax_gen_length: 6\nmicro-batch-size: 2\n",
                       tmp_path)
    predictions = [tiny_tokenizer.detokenize(g) for g in generated]
    targets = [[tiny_tokenizer.detokenize(tiny_tokenizer.tokenize(t)) for t in items[0]["targets_pretokenized"]],
               [tiny_tokenizer.detokenize(t) for t in items[1]["targets"]],
               [tiny_tokenizer.detokenize(tiny_tokenizer.tokenize(t)) for t in items[2]["targets_pretokenized"]]]
    em = 100 * np.mean([max(M.exact_match_score(p, t) for t in ts) for p, ts in zip(predictions, targets)])
    f1 = 100 * np.mean([max(M.f1_score(p, t) for t in ts) for p, ts in zip(predictions, targets)])
    metrics = result.groups["all"][0].metrics
    assert metrics["EM"] == pytest.approx(em) and metrics["F1"] == pytest.approx(f1)
    assert metrics["EM"] > 0 and 0 < metrics["F1"] < 100


def test_language_model_perplexity_equals_independent_losses(backend_model, tiny_model, tiny_tokenizer, tmp_path):
    backend, model = backend_model
    text = (REPO / "data" / "corpus" / "en.txt").read_text(encoding="utf-8")[5000:6500]
    (tmp_path / "data" / "lm").mkdir(parents=True)
    (tmp_path / "data" / "lm" / "doc.txt").write_text(text, encoding="utf-8")
    register_metric("LossSum")(lambda losses, examples: math.fsum(losses))
    try:
        result = _run_task(model, "name: l\ntype: lm\npath: lm\nfile-pattern: '*.txt'\nuse_task_mask: true\n"
                                            "max_seq_length: 64\ngeneration_length: 24\nmicro-batch-size: 4\n"
                                            "metrics: [PPL, LossSum]\n", tmp_path)
    finally:
        del METRICS["LossSum"]
    doc = tiny_tokenizer.tokenize(text)
    assert len(doc) > 150  # several windows
    total = 0.0
    # Token i is scored once: the first 63 in the first window, with everything before them visible
    # causally; each later one after the 39 tokens that precede its group of 24, bidirectionally.
    first = 63
    groups = [(0, min(first, len(doc)))] + [(a, min(a + 24, len(doc))) for a in range(first, len(doc), 24)]
    for start, end in groups:
        prompt = doc[max(0, start - 39):start] if start else []
        tokens = prompt + [G_, SOP] + doc[start:end - 1]
        visible = _prefix_visible(len(tokens), len(prompt) + 1)
        log_probs = F.log_softmax(_reference_logits(tiny_model, tokens, list(range(len(tokens))), visible), -1)
        total += -sum(float(log_probs[len(prompt) + 1 + j, t]) for j, t in enumerate(doc[start:end]))
    metrics = result.groups["all"][0].metrics
    assert result.groups["all"][0].samples == len(groups)
    assert metrics["LossSum"] == pytest.approx(total, rel=TOLERANCE[backend])
    words = len(text.strip().split(" "))
    assert metrics["PPL"] == pytest.approx(math.exp(min(20.0, total / words)), rel=TOLERANCE[backend] * 20)


# --- bad data -----------------------------------------------------------------------------------

def _mc_task(model, tmp_path, lines: list[str], yaml_extra: str = ""):
    (tmp_path / "data" / "mc").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "mc" / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return _run_task(model, "name: mc\ntype: mul\npath: mc\n" + yaml_extra, tmp_path)


@pytest.fixture(scope="module")
def torch_tiny(tiny_checkpoint):
    with glmc.load(tiny_checkpoint) as model:
        yield model


@pytest.mark.parametrize("lines, message", [
    (['{"inputs": [1, 2], "choices": [[3], [4]], "label": 0}', '{"inputs": [1, 2], "choices": [[3]'],
     "test.jsonl:2: not valid JSON"),
    (['{"inputs": [1, 2], "choices": [[3], [4]], "label": 2}'], "test.jsonl:1: label 2 is out of range for 2"),
    (['{"inputs": [1, 2], "choices": [[3], [4]]}'], "test.jsonl:1: needs 'label'"),
    (['{"inputs": [1, 2000], "choices": [[3], [4]], "label": 0}'], "token id 2000, outside"),
    (['{"inputs_pretokenized": "hi", "choices": [[3], [4]], "label": 0}'], "the model has no tokenizer"),
    (['{"inputs": [1], "choices": [[3], []], "label": 0}'], "choice 1 is empty"),
])
def test_bad_data_names_file_and_line(torch_tiny, tmp_path, lines, message):
    with pytest.raises(GlmcError) as error:
        _mc_task(torch_tiny, tmp_path, lines)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_data_and_unknown_metric(torch_tiny, tmp_path):
    with pytest.raises(GlmcError, match="data folder .*/nowhere does not exist"):
        _run_task(torch_tiny, "name: mc\ntype: mul\npath: nowhere\n", tmp_path)
    with pytest.raises(GlmcError, match="no data files match '\\*\\*/\\*.csv'"):
        _mc_task(torch_tiny, tmp_path, ['{"inputs": [1], "choices": [[3], [4]], "label": 0}'],
                 "file-pattern: '**/*.csv'\n")
    with pytest.raises(GlmcError, match="unknown metric 'BLEU'"):
        _mc_task(torch_tiny, tmp_path, ['{"inputs": [1], "choices": [[3], [4]], "label": 0}'], "metrics: [BLEU]\n")


def test_custom_task_class_from_module(torch_tiny, tmp_path, monkeypatch):
    (tmp_path / "mytasks").mkdir()
    (tmp_path / "mytasks" / "__init__.py").write_text("")
    (tmp_path / "mytasks" / "first.py").write_text(
        "from glmc.evaluation import MultiChoiceTask\n"
        "class AlwaysFirst(MultiChoiceTask):\n"
        "    @property\n"
        "    def metrics(self):\n"
        "        return {'Picked0': lambda p, e: 100.0 * sum(x == 0 for x in p) / len(p)}\n"
        "    def predict_batch(self, samples):\n"
        "        return [0] * len(samples)\n")
    monkeypatch.chdir(tmp_path)
    result = _mc_task(torch_tiny, tmp_path, ['{"inputs": [1], "choices": [[3], [4]], "label": 1}'] * 3,
                      "module: mytasks.first.AlwaysFirst\n")
    assert result.groups["all"][0].metrics == {"Picked0": 100.0}


# --- the command line -----------------------------------------------------------------------------

def _glmc(*args: str, cwd: Path = REPO):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "glmc", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_cli_evaluates_a_folder_of_the_three_types_on_the_embedded_model(tmp_path):
    out = tmp_path / "results.json"
    result = _glmc("evaluate", "tasks/demo", "--data-path", "tasks/demo/data", "--output", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for name in ("fortune-choice", "fortune-fill", "fortune-lm"):
        assert f"Evaluating task {name}:" in text and f"Finish task {name} in " in text
    assert "Finish 3 tasks in " in text
    document = json.loads(out.read_text(encoding="utf-8"))
    tasks = {t["name"]: t for t in document["tasks"]}
    choice = tasks["fortune-choice"]["groups"]["test"]
    assert sorted(choice["files"]) == ["en/test.jsonl", "zh/test.jsonl"]
    stats = choice["summary"]["Accuracy"]
    assert (f"  Group test Accuracy: max = {stats['max']:.3f}, median = {stats['median']:.3f}, "
            f"average = {stats['average']:.3f}") in text
    for file, entry in choice["files"].items():
        assert f"      Finish {file}, Accuracy = {entry['metrics']['Accuracy']:.3f}" in text
    fill = tasks["fortune-fill"]["groups"]["test"]["summary"]
    assert "  Group test:" in text and f"      Metric EM: max = {fill['EM']['max']:.3f}" in text
    ppl = tasks["fortune-lm"]["groups"]["test"]["summary"]["PPL"]
    assert f"  Group test PPL: max = {ppl['max']:.3f}" in text
    assert tasks["fortune-lm"]["config"]["max_seq_length"] == 256


def _id_task(tmp_path: Path) -> Path:
    items = [{"inputs": [3 + i, 40 + i, 7], "choices": [[11 + i], [12], [13, 14]], "label": i % 3} for i in range(9)]
    _write(tmp_path / "data" / "mc" / "test.jsonl", items)
    return _yaml(tmp_path, "name: ids\ntype: mul\npath: mc\nmicro-batch-size: 4\n")


def test_cli_tensor_parallel_scores_equal_one_rank(tiny_checkpoint, tmp_path):
    task = _id_task(tmp_path)
    runs = []
    for tp in ("1", "2"):
        out = tmp_path / f"tp{tp}.json"
        result = _glmc("evaluate", str(task), "--data-path", str(tmp_path / "data"), "--checkpoint",
                       str(tiny_checkpoint), "--tp", tp, "--output", str(out), "--no-progress", "--json")
        assert result.returncode == 0, result.stderr
        printed = json.loads(result.stdout)
        assert printed == json.loads(out.read_text(encoding="utf-8"))
        runs.append(printed["tasks"][0]["groups"]["all"]["files"]["test.jsonl"]["metrics"])
    assert runs[0] == runs[1]


def test_cli_import_registers_a_metric_a_task_file_names(tiny_checkpoint, tmp_path):
    (tmp_path / "labelmetrics.py").write_text(
        "from glmc.evaluation import register_metric\n"
        "@register_metric('Label2Share')\n"
        "def label2_share(predictions, examples):\n"
        "    return 100.0 * sum(e['label'] == 2 for e in examples) / len(examples)\n")
    task = _id_task(tmp_path)
    task.write_text(task.read_text() + "metrics: [Accuracy, Label2Share]\n")
    args = ["evaluate", str(task), "--data-path", str(tmp_path / "data"), "--checkpoint", str(tiny_checkpoint),
            "--output", str(tmp_path / "r.json"), "--no-progress", "--json"]
    refused = _glmc(*args, cwd=tmp_path)
    assert refused.returncode == 1 and "unknown metric 'Label2Share'" in refused.stderr
    result = _glmc(*args, "--import", "labelmetrics", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)["tasks"][0]["groups"]["all"]["files"]["test.jsonl"]["metrics"]
    assert metrics["Label2Share"] == pytest.approx(100.0 * 3 / 9)  # labels i % 3 for i < 9
    assert set(metrics) == {"Accuracy", "Label2Share"}


@pytest.mark.parametrize("args, message", [
    (["nowhere.yaml"], "nowhere.yaml: no such task file or folder"),
    (["BAD"], "not valid YAML"),
    (["GOOD", "--backend", "tensorflow"], "unknown backend 'tensorflow'"),
    (["GOOD", "--data-path", "/nonexistent"], "data folder /nonexistent/mc does not exist"),
    (["GOOD", "--import", "no_such_module_here"], "--import no_such_module_here: cannot be imported"),
])
def test_cli_errors_are_one_line(tiny_checkpoint, tmp_path, args, message):
    good = _id_task(tmp_path)
    bad = _yaml(tmp_path, "name: [x\n", "bad.yaml")
    args = [str(good) if a == "GOOD" else str(bad) if a == "BAD" else a for a in args]
    if "--data-path" not in args:
        args += ["--data-path", str(tmp_path / "data")]
    result = _glmc("evaluate", *args, "--checkpoint", str(tiny_checkpoint), "--no-progress")
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmc: error: ") and message in lines[0], result.stderr
