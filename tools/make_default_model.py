"""Regenerate glmc's embedded default model (glmc/embedded/default) deterministically.

    python tools/make_default_model.py

It trains the SentencePiece text model on data/corpus (icetk's layout, 8,000
pieces; commands right after the text pieces, so no image-id offset), and writes a
small GLM with fixed, non-degenerate random weights (seed 1234) as a SAT checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from glmc.checkpoint import model_state, save_checkpoint
from glmc.config import GLMConfig
from glmc.model import GLMModel
from glmc.model.init import init_wide_random_
from glmc.tokenizer import IceTokenizer
from glmc.tokenizer.train import corpus_lines, train_ice_text_model

REPO = Path(__file__).resolve().parents[1]
TEXT_PIECES = 8000
CONFIG = GLMConfig(num_layers=3, hidden_size=64, num_attention_heads=8, inner_hidden_size=128,
                   vocab_size=8192, max_sequence_length=256)
SEED = 1234


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "data/corpus")
    parser.add_argument("--out", type=Path, default=REPO / "glmc/embedded/default")
    args = parser.parse_args()

    texts = [(args.corpus / name).read_text(encoding="utf-8") for name in ("en.txt", "zh.txt")]
    sp_model = train_ice_text_model(corpus_lines(texts), TEXT_PIECES)
    tokenizer_section = {"model": "ice_text.model", "text_offset": 0, "variant": "icetk"}

    model = init_wide_random_(GLMModel(CONFIG, dtype=torch.float32), SEED)
    save_checkpoint(args.out, CONFIG, [model_state(model)], iteration="1",
                    metadata={"tokenizer": tokenizer_section, "description":
                              "random non-degenerate weights (seed 1234); not trained"},
                    files={"ice_text.model": sp_model}, overwrite=True)
    tokenizer = IceTokenizer(args.out / "ice_text.model", text_offset=0)
    assert tokenizer.special.dblock < CONFIG.vocab_size
    print(f"{args.out}: {CONFIG.parameter_count():,} parameters; commands at {tokenizer.special.mask}")


if __name__ == "__main__":
    main()
