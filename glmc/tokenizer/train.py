"""Train a SentencePiece text model in icetk's layout (for small GLMs of our own).

icetk's `ice_text.model` is a SentencePiece model with `<unk>` 0, `<s>` 1, `</s>` 2,
a `<n>` piece, and NFKC normalisation that folds whitespace runs; the commands
are not pieces but ids after the text pieces.
"""

from __future__ import annotations

import io
from typing import Iterable

import sentencepiece as spm


def train_ice_text_model(lines: Iterable[str], vocab_size: int) -> bytes:
    """The serialized model; deterministic for the same lines and size."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=["<n>"],
        normalization_rule_name="nmt_nfkc",
        num_threads=1,  # more threads make the result depend on scheduling
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    return buffer.getvalue()


def corpus_records(text: str) -> list[str]:
    """Records of a fortune-style file: text blocks separated by lines holding only `%`."""
    return [r.strip("\n") for r in text.split("\n%\n") if r.strip()]


def corpus_lines(texts: Iterable[str]) -> list[str]:
    return [line for text in texts for record in corpus_records(text)
            for line in record.split("\n") if line.strip()]
