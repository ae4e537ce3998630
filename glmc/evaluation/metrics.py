"""Metrics by name, computed as GLM-130B's evaluation/metrics.py computes them.

A metric is `fn(predictions, examples) -> float` (a dict of floats is also allowed;
only floats enter the group summaries). `examples` are the dataset's items:

* multiple choice: predictions are choice indices; items have "label".
* generation: predictions are the decoded generated texts; items have
  "targets_text", the decoded targets (GLM-130B decodes the tokenized targets,
  so normalisation by the tokenizer applies to both sides alike).
* language modelling: predictions are the summed token losses of each window;
  the single item has "num_original_tokens" (words of the raw text).

`register_metric("Name")` adds one; a task YAML then lists it under `metrics`.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any, Callable

from glmc.errors import GlmcError

Metric = Callable[[list, list[dict]], Any]
_PUNCTUATION = frozenset(string.punctuation)

METRICS: dict[str, Metric] = {}


def register_metric(name: str) -> Callable[[Metric], Metric]:
    """Decorator: make `fn` available to task files as `metrics: [name]`."""
    def add(fn: Metric) -> Metric:
        METRICS[name] = fn
        return fn
    return add


def get_metric(name: str, source: str = "task") -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise GlmcError(f"{source}: unknown metric '{name}': choose from {', '.join(sorted(METRICS))} "
                        "(or register one with glmc.evaluation.register_metric)") from None


@register_metric("Accuracy")
def accuracy(predictions: list[int], examples: list[dict]) -> float:
    _same_length(predictions, examples)
    correct = sum(p == e["label"] for p, e in zip(predictions, examples))
    return correct * 100.0 / max(len(predictions), 1)


def _micro_counts(predictions: list, examples: list[dict]) -> tuple[int, int, int]:
    """True positives, false positives, false negatives summed over every label (micro averaging)."""
    _same_length(predictions, examples)
    tp = fp = fn = 0
    for label in {e["label"] for e in examples} | set(predictions):
        for p, e in zip(predictions, examples):
            tp += p == label and e["label"] == label
            fp += p == label and e["label"] != label
            fn += p != label and e["label"] == label
    return tp, fp, fn


@register_metric("Precision")
def micro_precision(predictions: list, examples: list[dict]) -> float:
    tp, fp, _ = _micro_counts(predictions, examples)
    return 100.0 * tp / (tp + fp) if tp + fp else 0.0


@register_metric("Recall")
def micro_recall(predictions: list, examples: list[dict]) -> float:
    tp, _, fn = _micro_counts(predictions, examples)
    return 100.0 * tp / (tp + fn) if tp + fn else 0.0


@register_metric("F1_mul")
def micro_f1(predictions: list, examples: list[dict]) -> float:
    """sklearn's f1_score(average="micro") * 100, which GLM-130B calls for multiple choice."""
    tp, fp, fn = _micro_counts(predictions, examples)
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    predicted = normalize_answer(prediction).split()
    truth = normalize_answer(ground_truth).split()
    common = sum((Counter(predicted) & Counter(truth)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(truth)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def qa_evaluate(predictions: list[str], examples: list[dict], metric: Callable[[str, str], float]) -> float:
    """Each prediction scored against its best target, averaged over examples, times 100."""
    _same_length(predictions, examples)
    total = sum(max((metric(p, t) for t in e["targets_text"]), default=0.0) for p, e in zip(predictions, examples))
    return 100.0 * total / max(len(predictions), 1)


@register_metric("EM")
def qa_exact_match(predictions: list[str], examples: list[dict]) -> float:
    return qa_evaluate(predictions, examples, exact_match_score)


@register_metric("F1")
def qa_f1(predictions: list[str], examples: list[dict]) -> float:
    return qa_evaluate(predictions, examples, f1_score)


@register_metric("PPL")
def perplexity(window_losses: list[float], examples: list[dict]) -> float:
    """exp(total loss / words of the original text), capped at exp(20) as GLM-130B caps it."""
    return math.exp(min(20.0, math.fsum(window_losses) / examples[0]["num_original_tokens"]))


def _same_length(predictions: list, examples: list[dict]) -> None:
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
