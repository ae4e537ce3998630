#!/usr/bin/env python3
"""Golden tokenizer data from icetk and SwissArmyTransformer's own tokenizer code.

glmc reimplements GLM-130B's tokenizer without icetk. This script runs the real
thing on glmc's small SentencePiece model (icetk's layout: `<unk>` 0, `<s>` 1,
`</s>` 2, a `<n>` piece) and writes what it returns, so glmc can be tested
against it (tests/test_tokenizer.py):

* SAT 0.2.12 (GLM-130B's pin): `SwissArmyTransformer.tokenization.icetk_glm_130B.
  _IceTokenizer`, which wraps icetk 0.0.7's module-level `icetk.icetk`:
  `tokenize` ids (text ids offset by icetk's 20,000 image ids), icetk's
  `decode` of those ids, `detokenize`, and `detokenize` of id lists that mix
  text ids with command ids.
* SAT >= 0.3: `sat.tokenization.icetk_glm_130B.ice_tokenizer.GLM130BTokenizer`
  with default arguments: `encode` / `decode`, `num_text_tokens` and the ids of
  the pieces it appends to the model.

It re-implements nothing: it imports icetk and both SAT versions and calls
them. The real `ice_text.model` is never used or downloaded: the model given by
--model is copied into a temporary folder of its own as `ice_text.model` and
icetk is pointed there (icetk's `auto_create` only downloads a missing file; the
script checks the file is there and makes any download attempt fail loudly).

Environment (a venv of its own: icetk's generated sentencepiece_model_pb2 needs an
old protobuf, 3.20.x)::

    python3 -m venv icetk-venv
    icetk-venv/bin/pip install protobuf==3.20.3 sentencepiece torch==2.13.0 \
        numpy pillow requests tqdm filelock
    icetk-venv/bin/pip install --no-deps icetk==0.0.7 SwissArmyTransformer==0.2.12
    # SAT 0.3.x has the same distribution name, so it goes to a folder of its own:
    icetk-venv/bin/pip install --no-deps --target icetk-venv/sat03 SwissArmyTransformer==0.3.6

Run (from the repository root)::

    icetk-venv/bin/python tools/icetk_goldens.py \\
        --model glmc/embedded/default/ice_text.model --out tests/data/icetk/goldens.json

`--sat03` names the folder holding SAT 0.3.x's `sat` package (default: `sat03`
inside the venv). Only the tokenizer modules of SAT are loaded (by file path, as
packages of their own), because the packages' `__init__` import training code.
Modules used only for images or other tokenizers (`torchvision`, `transformers`)
are replaced by stubs when they are not installed; `meta.stubs` lists them.
Output is deterministic (no timestamps, no temporary paths).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import types
from pathlib import Path

COMMANDS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "eos", "eod", "ENC", "dBLOCK")
SAT03_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>",
                "<|tab|>", "<|blank_2|>", "<|blank_80|>", "<0x00>", "<0xFF>")


def spaces(n: int) -> str:
    return " " * n


TEXTS: list[str] = [
    # English
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "GLM-130B is an open bilingual (English & Chinese) bidirectional dense model with 130 billion parameters.",
    "Tsinghua University is in Beijing.",
    # Chinese: simplified, traditional, classical poems with full-width punctuation
    "清华大学是一所位于北京的大学。",
    "我爱自然语言处理，你呢？",
    "臺灣的傳統文化與歷史非常豐富。",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "國破山河在，城春草木深。感時花濺淚，恨別鳥驚心。",
    "（全角括号）【方括号】「引号」、顿号；分号：冒号……破折号——！？",
    # mixed English / Chinese
    "GLM-130B 是一个开源的双语（中文和英文）模型。",
    "我今天用Python写了一个tokenizer，效果很好!",
    # spaces: leading, trailing, multiple, only spaces
    " leading space",
    "trailing space ",
    "  two leading and two trailing  ",
    "multiple   spaces    between  words",
    spaces(3),
    # newlines and tabs
    "line one\nline two",
    "para one\n\npara two",
    "windows\r\nline\r\nendings\r\n",
    "\n",
    "col1\tcol2\t\tcol3",
    "\t",
    "def f(x):\n    return x * 2\n",
    # runs of 2..100 spaces
    "a" + spaces(2) + "b" + spaces(3) + "c" + spaces(4) + "d" + spaces(7) + "e",
    "x" + spaces(16) + "y",
    "x" + spaces(79) + "y",
    "x" + spaces(80) + "y",
    "x" + spaces(81) + "y",
    "x" + spaces(100) + "y",
    # characters not in the model
    "I love 🤖 and 🎉!",
    "𠀀𪚥龘 are rare",
    "Привет, мир!",
    "مرحبا بالعالم",
    "café naïve résumé",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ﬁ",
    # digits and punctuation
    "3.14159 2653 1,000,000 2024-01-01 12:34:56 007",
    "!@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    # literal command / piece strings in text
    "The answer is [MASK].",
    "[gMASK] 问题：中国的首都是哪里？",
    "[sMASK]<sop><eop><eod>",
    "first<n>second",
    "end of text</s>more",
    "<unk><s> x",
    "code<|tab|>indent<|blank_4|>x",
    # empty
    "",
]


def detokenize_id_lists(tok, cmd) -> list[list[int]]:
    """A dozen id lists mixing text ids with command ids (built from SAT 0.2.12's own ids)."""
    t = tok.tokenize
    newline = tok.tokenizer["<n>"]  # icetk's piece lookup, offset included
    return [
        [cmd["[MASK]"]] + t("Hello world"),
        t("问题：中国的首都是哪里？") + [cmd["[gMASK]"]],
        t("The capital of France is") + [cmd["[MASK]"]] + t(". It is large."),
        [cmd["[gMASK]"], cmd["sop"]] + t("床前明月光"),
        t("Hello world") + [cmd["[MASK]"]] + t("again") + [cmd["sop"], cmd["eos"]],
        t("Tsinghua University") + [cmd["eos"]],
        t("first part") + [cmd["eop"]] + t("second part") + [cmd["eos"]],
        [cmd[name] for name in COMMANDS],
        t("床前") + [cmd["[sMASK]"]] + t("光，疑是地上霜。"),
        [cmd["ENC"]] + t("encoder text") + [cmd["dBLOCK"]] + t("decoder text"),
        t("one document") + [cmd["eod"]] + t("another document"),
        t("Hello world") + [newline] + t("again") + [cmd["[MASK]"], newline],
        [20001] + t("bos and unk") + [20000, cmd["eos"]],
        [cmd["eos"], cmd["eos"]] + t("x") + [cmd["eop"], cmd["eop"]],
        [],
    ]


# Ids outside the text range that are not commands: icetk's decode subtracts
# 20,000 and hands the result to SentencePiece, which refuses it.
DETOKENIZE_ERROR_IDS = [[0], [5], [19999], [150100], [0, 150000]]


def install_stubs() -> list[dict]:
    """Stub modules that icetk / SAT import at module level but never use for text."""
    applied = []

    def missing(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            return True

    if missing("torchvision"):
        def _images_only(*_a, **_k):
            raise RuntimeError("torchvision stub: images are not supported here")

        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")
        fn = types.ModuleType("torchvision.transforms.functional")
        for attr in ("Compose", "Resize", "CenterCrop", "Normalize", "ToTensor"):
            setattr(tr, attr, _images_only)
        fn.pil_to_tensor = _images_only
        tv.transforms, tr.functional = tr, fn
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tr,
                            "torchvision.transforms.functional": fn})
        applied.append({"module": "torchvision",
                        "why": "icetk's ice_tokenizer.py / image_tokenizer.py import torchvision.transforms "
                               "at import time; it is used only for image tokens"})
    if missing("transformers"):
        class AutoTokenizer:  # noqa: D401 - stub
            @classmethod
            def from_pretrained(cls, *_a, **_k):
                raise RuntimeError("transformers stub")

        tf = types.ModuleType("transformers")
        tf.AutoTokenizer = AutoTokenizer
        sys.modules["transformers"] = tf
        applied.append({"module": "transformers",
                        "why": "SAT's icetk_glm_130B/tokenizer.py imports transformers.AutoTokenizer "
                               "at import time but never uses it"})
    return applied


def load_package(name: str, folder: Path) -> types.ModuleType:
    """Import `folder` (a package directory) under `name`, without its parent packages."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def dist_version(name: str, path: Path | None = None) -> str:
    if path is None:
        return importlib.metadata.version(name)
    for dist in importlib.metadata.distributions(path=[str(path)]):
        if dist.metadata["Name"] == name:
            return dist.version
    raise RuntimeError(f"{name} not found in {path}")


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a SentencePiece model in icetk's layout")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sat03", type=Path, default=Path(sys.prefix) / "sat03",
                        help="folder holding SAT 0.3.x's `sat` package (pip install --target)")
    args = parser.parse_args()

    model_bytes = args.model.read_bytes()
    model_sha = hashlib.sha256(model_bytes).hexdigest()
    stubs = install_stubs()

    workdir = Path(tempfile.mkdtemp(prefix="icetk-goldens-"))
    try:
        shutil.copyfile(args.model, workdir / "ice_text.model")
        assert (workdir / "ice_text.model").is_file()

        import icetk
        import icetk.utils

        def _no_download(save_path, url):
            raise RuntimeError(f"refusing to download {url} to {save_path}")

        # Guard only: auto_create downloads only a missing file, and ours is there.
        icetk.utils.download_with_progress_bar = _no_download
        icetk.icetk.configure(path=str(workdir), device="cpu", fp16=False)

        # --- SAT 0.2.12 ---------------------------------------------------------------
        sat_spec = importlib.util.find_spec("SwissArmyTransformer")
        sat0212_dir = Path(sat_spec.submodule_search_locations[0]) / "tokenization" / "icetk_glm_130B"
        sat0212 = load_package("sat0212_icetk_glm_130B", sat0212_dir)
        tok = sat0212._IceTokenizer()
        assert tok.tokenizer is icetk.icetk, "SAT 0.2.12 did not pick up icetk"
        import sentencepiece as spm
        own = spm.SentencePieceProcessor(model_proto=model_bytes)
        assert icetk.icetk.num_text_tokens == own.vocab_size(), "icetk did not load the given model"
        cmd = {name: tok.get_command(name) for name in COMMANDS}

        # --- SAT 0.3.x ----------------------------------------------------------------
        sat03_dir = args.sat03 / "sat" / "tokenization" / "icetk_glm_130B"
        sat03 = load_package("sat03_icetk_glm_130B", sat03_dir)
        glm = sat03.ice_tokenizer.GLM130BTokenizer(path=str(workdir))

        cases = []
        for text in TEXTS:
            ids = tok.tokenize(text)
            enc03 = glm.encode(text)
            cases.append({
                "text": text,
                "sat0212_tokenize": ids,
                "icetk_pieces": icetk.icetk.tokenize(text),
                "icetk_decode": icetk.icetk.decode(ids),
                "sat0212_detokenize": tok.detokenize(ids),
                "sat03_encode": enc03,
                "sat03_pieces": glm.tokenize(text),
                "sat03_decode": glm.decode(enc03),
            })

        detok_cases = [{"ids": ids, "sat0212_detokenize": tok.detokenize(ids)}
                       for ids in detokenize_id_lists(tok, cmd)]
        detok_errors = []
        for ids in DETOKENIZE_ERROR_IDS:
            try:
                out = tok.detokenize(ids)
            except Exception as exc:  # recorded, not raised: this is SAT's behaviour
                detok_errors.append({"ids": ids, "raises": error_text(exc)})
            else:
                detok_errors.append({"ids": ids, "sat0212_detokenize": out})

        id_to_token = {}
        for idx in (0, 150000, 150001, 20002):
            id_to_token[str(idx)] = tok.IdToToken(idx)

        sat03_info = {
            "version": dist_version("SwissArmyTransformer", args.sat03),
            "class": "sat.tokenization.icetk_glm_130B.ice_tokenizer.GLM130BTokenizer",
            "arguments": "GLM130BTokenizer(path=<model folder>) with defaults "
                         "(max_blank_length=80, byte_fallback=True); encode/decode with defaults "
                         "(linebreak=True, whitespaces=True, special_tokens=False, add_dummy_prefix=True)",
            "num_text_tokens": glm.num_text_tokens,
            "num_tokens": glm.num_tokens,
            # The configured SentencePiece processor's size (model pieces + appended pieces);
            # num_text_tokens adds the appended counts to it again.
            "text_tokenizer_num_tokens": glm.text_tokenizer.num_tokens,
            "last_id": glm.num_image_tokens + glm.text_tokenizer.num_tokens - 1,
            "appended_piece_ids": {piece: glm[piece] for piece in SAT03_PIECES},
            "per_text": "cases[*].sat03_encode / sat03_pieces / sat03_decode",
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    out = {
        "meta": {
            "generator": "tools/icetk_goldens.py",
            "model": {"file": args.model.name, "sha256": model_sha, "size": len(model_bytes),
                      "pieces": icetk.icetk.num_text_tokens},
            "versions": {
                "python": platform.python_version(),
                "icetk": dist_version("icetk"),
                "SwissArmyTransformer_0_2": dist_version("SwissArmyTransformer"),
                "SwissArmyTransformer_0_3": sat03_info["version"],
                "sentencepiece": dist_version("sentencepiece"),
                "protobuf": dist_version("protobuf"),
                "torch": dist_version("torch"),
            },
            "stubs": stubs,
            "patches": [{
                "what": "icetk.utils.download_with_progress_bar replaced by a function that raises",
                "why": "guard: the model file is present, so icetk's auto_create never calls it; "
                       "nothing may be downloaded",
            }],
            "loading": "SAT's tokenization/icetk_glm_130B folders are imported by file path as packages "
                       "of their own (the SAT packages' __init__ import training code); icetk's "
                       "module-level icetk.icetk is configured with path=<folder holding the model "
                       "copied as ice_text.model>, device='cpu', fp16=False",
            "id_layout": "SAT 0.2.12: text piece p -> 20000 + p; commands are fixed ids from 150000; "
                         "eos is 20002 (</s>)",
        },
        "texts": TEXTS,
        "commands": cmd,
        "sat0212_id_to_token": id_to_token,
        "cases": cases,
        "detokenize_cases": detok_cases,
        "detokenize_error_cases": detok_errors,
        "sat03": sat03_info,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(cases)} texts, {len(detok_cases)} detokenize cases, "
          f"{len(detok_errors)} error cases")


if __name__ == "__main__":
    main()
