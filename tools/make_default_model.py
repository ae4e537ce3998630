"""Make glmc's embedded default model (glmc/embedded/default) from the corpus in data/corpus.

The default model is trained by glmc itself. Three steps, run once by a developer:

    python tools/make_default_model.py tokenizer            # 1. glmc/embedded/default/ice_text.model
    glmc train --config glm-demo --data data/corpus/en.txt --data data/corpus/zh.txt \\
        --steps 4500 --batch-size 16 --seq-len 256 --lr 1e-3 --warmup-steps 100 \\
        --save-interval 250 --out demo-ckpt --json > demo-train.json
                                                            # 2. train (reads that tokenizer)
    python tools/make_default_model.py package demo-ckpt --summary demo-train.json
                                                            # 3. fp16 copy into glmc/embedded/default

Step 1 trains the SentencePiece text model (icetk's layout, 8,000 pieces; the
commands right after the text pieces, so no image-id offset) and is deterministic.
Step 3 stores the trained weights in fp16 (half the size; on CPU glmc computes in
float32 all the same) and records the training facts and the held-out loss of the
stored weights in model_config.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from glmc.checkpoint import SatCheckpoint, save_checkpoint
from glmc.checkpoint.sat import CONFIG_FILE
from glmc.fileio import write_text_atomic
from glmc.tokenizer import IceTokenizer
from glmc.tokenizer.train import corpus_lines, train_ice_text_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "glmc/embedded/default"
TEXT_PIECES = 8000
TOKENIZER_SECTION = {"model": "ice_text.model", "text_offset": 0, "variant": "icetk"}


def make_tokenizer(corpus: Path, out: Path) -> None:
    texts = [(corpus / name).read_text(encoding="utf-8") for name in ("en.txt", "zh.txt")]
    out.mkdir(parents=True, exist_ok=True)
    (out / "ice_text.model").write_bytes(train_ice_text_model(corpus_lines(texts), TEXT_PIECES))
    print(f"{out / 'ice_text.model'}: {TEXT_PIECES} pieces")


def package(trained: Path, out: Path, corpus: Path, summary: Path | None) -> None:
    """Store the trained weights in fp16 and record the held-out losses of what is stored."""
    from glmc.checkpoint import load_model, model_state
    from glmc.model import GLMModel
    from glmc.train.data import Corpus
    from glmc.train.trainer import TrainOptions, deepnorm_init_, heldout_loss

    ckpt = SatCheckpoint.open(trained)
    half_state = model_state(load_model(ckpt, dtype=torch.float16))
    tokenizer_bytes = (trained / "ice_text.model").read_bytes()
    facts = json.loads(summary.read_text(encoding="utf-8").strip().splitlines()[-1]) if summary else {}
    metadata = {
        "tokenizer": TOKENIZER_SECTION,
        "description": "trained by glmc train (GLM blank infilling) on data/corpus; weights stored in fp16",
        "training": {key: facts[key] for key in ("steps", "final_loss", "seconds", "tokens_per_second", "device")
                     if key in facts},
    }
    save_checkpoint(out, ckpt.config, [half_state], iteration=ckpt.iteration, metadata=metadata,
                    files={"ice_text.model": tokenizer_bytes}, overwrite=True)

    # The held-out loss of the shipped (fp16) weights as glmc computes with them on CPU
    # (float32), next to the untrained model's: the numbers the README records.
    tokenizer = IceTokenizer(out / "ice_text.model", text_offset=0)
    data = Corpus.build([corpus / "en.txt", corpus / "zh.txt"], tokenizer)
    options = TrainOptions(steps=1)
    shipped = load_model(SatCheckpoint.open(out), dtype=torch.float32)
    untrained = deepnorm_init_(GLMModel(ckpt.config), options.seed)
    metadata["training"]["heldout_loss"] = round(heldout_loss(shipped, data, tokenizer, options, "cpu"), 4)
    metadata["training"]["untrained_heldout_loss"] = round(heldout_loss(untrained, data, tokenizer, options, "cpu"), 4)
    sat_args = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
    sat_args["glmc"] = metadata
    write_text_atomic(out / CONFIG_FILE, json.dumps(sat_args, indent=2, ensure_ascii=False) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {ckpt.config.parameter_count():,} parameters in fp16, {size / 2**20:.1f} MiB; held-out loss "
          f"{metadata['training']['heldout_loss']:.4f} (untrained {metadata['training']['untrained_heldout_loss']:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["tokenizer", "package"])
    parser.add_argument("trained", type=Path, nargs="?", help="the checkpoint `glmc train` wrote (package)")
    parser.add_argument("--corpus", type=Path, default=REPO / "data/corpus")
    parser.add_argument("--summary", type=Path, help="the `glmc train --json` output (package): its facts are recorded")
    parser.add_argument("--out", type=Path, default=DEFAULT)
    args = parser.parse_args()
    if args.step == "tokenizer":
        make_tokenizer(args.corpus, args.out)
    elif args.trained is None:
        parser.error("package needs the trained checkpoint")
    else:
        package(args.trained, args.out, args.corpus, args.summary)


if __name__ == "__main__":
    main()
