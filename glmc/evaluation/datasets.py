"""Task data files read into items, as GLM-130B's evaluation/dataset.py reads them.

Multiple choice and generation files are JSON lines; each field is given either
as token ids (`inputs`, `choices`, `targets`) or as text (`inputs_pretokenized`,
...), tokenized here. Language-modelling files are plain text, one document per
file. Every problem names the file and, for JSON lines, the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from glmc.errors import GlmcError
from glmc.fileio import parse_json, read_text
from glmc.evaluation.config import GenerationTaskConfig, LanguageModelTaskConfig, MultiChoiceTaskConfig, shown
from glmc.evaluation.samples import (
    GenerationSample,
    LanguageModelSample,
    MultiChoiceSample,
    generation_sample,
    language_model_sample,
    language_model_windows,
    multiple_choice_sample,
)
from glmc.tokenizer.special import SpecialTokens


class DataError(GlmcError):
    pass


@dataclass(frozen=True)
class Vocabulary:
    """What reading data needs from the model."""

    special: SpecialTokens
    vocab_size: int
    tokenize: Callable[[str], list[int]] | None  # None: the model has no tokenizer
    detokenize: Callable[[list[int]], str] | None

    def decode(self, ids: list[int]) -> str:
        """Text of ids (without a tokenizer: the ids, space-separated, so that EM and F1 compare tokens)."""
        return self.detokenize(ids) if self.detokenize is not None else " ".join(map(str, ids))


MAX_LINE_BYTES = 16 << 20  # one JSON line: an item, never megabytes of it
MAX_DOCUMENT_BYTES = 256 << 20  # a language-modelling document is tokenized whole (WikiText-103's test: 1.3 MB)


def json_lines(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, item) per non-blank line, `where` being "FILE:LINE"; a file without items is an error.

    Lines are parsed strictly (`parse_json`: no NaN, no key twice, nesting bounded) and each is
    read bounded, so one endless line cannot exhaust memory."""
    try:
        file = path.open(encoding="utf-8")
    except OSError as error:
        raise DataError(f"{path}: {error.strerror or error}") from None
    with file:
        number, items = 0, 0
        try:
            while line := file.readline(MAX_LINE_BYTES + 1):
                number += 1
                if len(line) > MAX_LINE_BYTES:
                    raise DataError(f"{path}:{number}: a line longer than {MAX_LINE_BYTES:,} characters")
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                item = parse_json(line, where, DataError)
                if not isinstance(item, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
                items += 1
                yield where, item
        except UnicodeDecodeError:
            raise DataError(f"{path}:{number + 1}: not UTF-8 text") from None
    if not items:
        raise DataError(f"{path}: no items (the file is empty; a data file holds one JSON object per line)")


def tokenized(item: dict, key: str, vocab: Vocabulary, where: str) -> list:
    """`item[key]` (ids, or a list of id lists) or `item[key + "_pretokenized"]` tokenized."""
    if key in item:
        value = item[key]
        nested = isinstance(value, list) and value and isinstance(value[0], list)
        for ids in value if nested else [value]:
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise DataError(f"{where}: '{key}' must be token ids (a list of integers, or of lists)")
            bad = [i for i in ids if not 0 <= i < vocab.vocab_size]
            if bad:
                raise DataError(f"{where}: '{key}' holds token id {bad[0]}, outside the model's vocabulary "
                                f"[0, {vocab.vocab_size})")
        return value
    raw_key = key + "_pretokenized"
    if raw_key not in item:
        raise DataError(f"{where}: needs '{key}' (token ids) or '{raw_key}' (text)")
    if vocab.tokenize is None:
        raise DataError(f"{where}: '{raw_key}' is text but the model has no tokenizer (pass --tokenizer, "
                        f"or give '{key}' as token ids)")
    raw = item[raw_key]
    texts = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(r, str) for r in texts):
        raise DataError(f"{where}: '{raw_key}' must be a string or a list of strings")
    try:
        ids = [vocab.tokenize(text) for text in texts]
    except GlmcError as error:  # text the tokenizer refuses (not Unicode): say where it is
        raise DataError(f"{where}: '{raw_key}': {error}") from None
    return ids if isinstance(raw, list) else ids[0]


class MultiChoiceDataset:
    """Items {"text", "choices", "label"}; one context with every choice after it per sample."""

    def __init__(self, path: Path, config: MultiChoiceTaskConfig, vocab: Vocabulary):
        self.path, self.config, self.vocab = path, config, vocab
        self.is_single_token = True  # every choice of every item is one token
        self.data: list[dict] = []
        for where, item in json_lines(path):
            self.data.append(self._item(item, where))

    def _item(self, item: dict, where: str) -> dict:
        text = _ids(tokenized(item, "inputs", self.vocab, where), "inputs", where)
        choices = tokenized(item, "choices", self.vocab, where)
        if not isinstance(choices, list) or not choices or not all(isinstance(c, list) for c in choices):
            raise DataError(f"{where}: 'choices' must be a non-empty list of choices")
        for index, choice in enumerate(choices):
            if not choice:
                raise DataError(f"{where}: choice {index} is empty (no tokens)")
        if "label" not in item:
            raise DataError(f"{where}: needs 'label', the index of the right choice")
        label = item["label"]
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise DataError(f"{where}: label {shown(label)} is out of range for {len(choices)} choices")
        target_length = sum(len(c) for c in choices)
        if target_length == len(choices):  # single tokens share one sop
            target_length = 1
        max_length = self.config.max_seq_length
        if target_length >= max_length:
            raise DataError(f"{where}: the choices take {target_length} tokens; max_seq_length is {max_length}")
        if len(text) + target_length + 2 > max_length:  # keep the end of the context
            text = text[len(text) - (max_length - target_length - 2):]
        if self.config.use_multitask_encoding and self.vocab.special.mask in text:
            raise DataError(f"{where}: blank filling ([MASK] in the text) does not combine with "
                            "use_multitask_encoding")
        if target_length != 1:
            self.is_single_token = False
        return {"text": text, "choices": choices, "label": label}

    def __len__(self) -> int:
        return len(self.data)

    def sample(self, index: int) -> MultiChoiceSample:
        item = self.data[index]
        return multiple_choice_sample(item["text"], item["choices"], self.vocab.special,
                                      is_single_token=self.is_single_token,
                                      use_task_mask=self.config.use_task_mask,
                                      unified_multitask_encoding=self.config.use_multitask_encoding)


class GenerationDataset:
    """Items {"text", "targets", "targets_text"}; the context to generate after per sample."""

    def __init__(self, path: Path, config: GenerationTaskConfig, vocab: Vocabulary):
        self.path, self.config, self.vocab = path, config, vocab
        self.data: list[dict] = []
        for where, item in json_lines(path):
            self.data.append(self._item(item, where))

    def _item(self, item: dict, where: str) -> dict:
        text = _ids(tokenized(item, "inputs", self.vocab, where), "inputs", where)
        targets = tokenized(item, "targets", self.vocab, where)
        if targets and not isinstance(targets[0], list):  # one target given alone
            targets = [targets]
        keep = self.config.max_seq_length - self.config.max_gen_length - 2
        if len(text) > keep:
            text = text[len(text) - keep:]
        mask = self.vocab.special.gmask
        if self.config.use_task_mask and mask in text:
            raise DataError(f"{where}: [gMASK] inside the text needs use_task_mask: false (blank filling)")
        return {"text": text, "targets": targets, "targets_text": [self.vocab.decode(t) for t in targets]}

    def __len__(self) -> int:
        return len(self.data)

    def sample(self, index: int) -> GenerationSample:
        return generation_sample(self.data[index]["text"], self.config.max_gen_length, self.vocab.special,
                                 use_task_mask=self.config.use_task_mask, unidirectional=self.config.unidirectional)


class LanguageModelDataset:
    """One document per file, scored in sliding windows; the single item has the document's tokens."""

    def __init__(self, path: Path, config: LanguageModelTaskConfig, vocab: Vocabulary):
        self.path, self.config, self.vocab = path, config, vocab
        raw_text = read_text(path, DataError, max_bytes=MAX_DOCUMENT_BYTES)
        if not raw_text.strip():
            raise DataError(f"{path}: no text to score")
        if vocab.tokenize is None:
            raise DataError(f"{path}: language modelling reads text, but the model has no tokenizer "
                            "(pass --tokenizer)")
        tokens = vocab.tokenize(raw_text)
        self.data = [{
            "tokens": tokens,
            "num_original_tokens": len(raw_text.strip().split(" ")),  # GLM-130B's word count
            "num_sequences": language_model_windows(len(tokens), config.max_seq_length, config.generation_length),
        }]

    def __len__(self) -> int:
        return self.data[0]["num_sequences"]

    def sample(self, index: int) -> LanguageModelSample:
        return language_model_sample(self.data[0]["tokens"], index, self.vocab.special,
                                     max_seq_length=self.config.max_seq_length,
                                     generation_length=self.config.generation_length,
                                     use_task_mask=self.config.use_task_mask,
                                     unidirectional=self.config.unidirectional)


def _ids(value, key: str, where: str) -> list[int]:
    if value and isinstance(value[0], list):
        raise DataError(f"{where}: '{key}' must be one sequence, not a list of them")
    return list(value)
