"""GLM-130B's tokenizer, read from icetk's `ice_text.model` with sentencepiece.

`IceTokenizer` reproduces what GLM-130B's pinned code runs (SAT 0.2.12's
`icetk-glm-130B` tokenizer wrapping icetk's `IceTokenizer`):

* `tokenize(text)`: SentencePiece ids of the text, each offset by the image
  vocabulary (20,000). Newlines, tabs and space runs are left to the model's own
  normaliser (icetk's default `ignore_linebreak=True`).
* `detokenize(ids)`: split at command ids, decode each text run on its own
  (`<n>` back to a newline) and print each command as `[name]`.
* commands at fixed ids (`[MASK]` 150000 ...), `eos` = the model's `</s>` + offset.

`variant="sat-0.3"` is SAT >= 0.3's `GLM130BTokenizer`: the command pieces, `<|tab|>`,
`<|blank_2|>`..`<|blank_80|>` and 256 byte pieces are appended to the model and
byte fallback is turned on, so whitespace and rare characters survive a round
trip. It changes token ids, so it is never chosen silently. Its `detokenize` is
SAT >= 0.3's `_IceTokenizer.detokenize`, which registers 79 more commands after
the eight: `<t>` and `<blank_2>`..`<blank_80>` (150008.. in GLM-130B's layout, the
ids the appended `<|tab|>` and blank pieces take), printed as `[<t>]`, `[<blank_2>]`.

Text is Unicode: a lone surrogate (what Python makes of bytes that are not UTF-8,
e.g. in a command-line argument) is refused in one line. A NUL character is text
like any other: icetk's model has no piece for it and reads it as `<unk>`
(`sat-0.3` keeps it as the byte piece `<0x00>`), as icetk and SAT do.

Nothing is ever downloaded: a missing model file is an error saying where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

from glmc.errors import GlmcError, PromptError
from glmc.tokenizer.special import SpecialTokens

VARIANTS = ("icetk", "sat-0.3")
ICETK_DEFAULT_PATH = Path("~/.icetk_models/ice_text.model")
MAX_BLANK = 80
MAX_MODEL_BYTES = 64 << 20  # icetk's ice_text.model is 2.7 MB
_SAT03_COMMAND_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")


class IceTokenizer:
    def __init__(self, model_path: str | os.PathLike, *, text_offset: int = 20000,
                 command_base: int | None = None, variant: str = "icetk"):
        if variant not in VARIANTS:
            raise GlmcError(f"unknown tokenizer variant '{variant}': choose from {', '.join(VARIANTS)}")
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise GlmcError(
                f"{path}: tokenizer model not found. glmc never downloads it: copy icetk's "
                f"ice_text.model there (icetk keeps it in {ICETK_DEFAULT_PATH}) or pass --tokenizer FILE")
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise GlmcError(f"{path}: {size:,} bytes, too large for a SentencePiece model "
                            f"(at most {MAX_MODEL_BYTES:,}; icetk's is 2.7 MB)")
        for name, value in (("text_offset", text_offset), ("command_base", command_base)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 <= value < 1 << 31):
                raise GlmcError(f"tokenizer {name} must be a non-negative integer, got {value!r:.40}")
        proto = sp_model.ModelProto()
        try:
            proto.ParseFromString(path.read_bytes())
            if not proto.pieces:
                raise ValueError("no pieces")
        except Exception as error:  # protobuf raises its own DecodeError
            raise GlmcError(f"{path}: not a SentencePiece model ({error})") from None
        self.path, self.variant, self.text_offset = path, variant, text_offset
        self.num_text_pieces = len(proto.pieces)  # before anything is appended
        if variant == "sat-0.3":
            _append_sat03_pieces(proto)
        self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        base = command_base if command_base is not None else text_offset + self.num_text_pieces
        self.special = SpecialTokens.from_base(base, eos=text_offset + self._sp.eos_id())
        self._command_names = self.special.names()
        if variant == "sat-0.3":
            # SAT >= 0.3's _IceTokenizer registers `<t>` and `<blank_2>`..`<blank_80>` as commands
            # after the eight: detokenize prints them as `[<t>]`, `[<blank_k>]`.
            extra = ["<t>"] + [f"<blank_{n}>" for n in range(2, MAX_BLANK + 1)]
            after = self.special.dblock + 1
            self._command_names.update({after + k: name for k, name in enumerate(extra)})

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce: text pieces (and, in sat-0.3, appended pieces), commands."""
        return max(self.text_offset + self._sp.get_piece_size(), self.special.dblock + 1)

    def get_command(self, name: str) -> int:
        return self.special.command(name)

    def tokenize(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise GlmcError(f"text to tokenize must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise PromptError(f"the text holds U+{ord(text[error.start]):04X} at character {error.start}, a lone "
                            "surrogate that is not Unicode text (bytes that are not UTF-8?)") from None
        if self.variant == "sat-0.3":
            text = _encode_whitespace(text)
        return [i + self.text_offset for i in self._sp.EncodeAsIds(text)]

    def decode_text(self, ids: list[int]) -> str:
        """Decode ids that are all text pieces (no commands)."""
        pieces = []
        for i in ids:
            local = i - self.text_offset
            if not 0 <= local < self._sp.get_piece_size():
                raise GlmcError(f"token id {i} is not a text piece of {self.path.name}")
            pieces.append(local)
        text = self._sp.DecodeIds(pieces).replace("<n>", "\n")
        return _decode_whitespace(text) if self.variant == "sat-0.3" else text

    def detokenize(self, ids: list[int]) -> str:
        """SAT's detokenize: text runs decoded separately, commands printed as `[name]` (in
        `sat-0.3`, also the whitespace commands `[<t>]`, `[<blank_k>]`)."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self._command_names or not self._is_text(i):
                out.append(self.decode_text(run))
                run = []
                out.append(self._id_to_token(i))
            else:
                run.append(i)
        out.append(self.decode_text(run))
        return "".join(out)

    def _is_text(self, i: int) -> bool:
        return 0 <= i - self.text_offset < self._sp.get_piece_size()

    def _id_to_token(self, i: int) -> str:
        if i in self._command_names:
            return f"[{self._command_names[i]}]"
        if 0 <= i < self.text_offset:
            return f"<image_{i}>"  # icetk's name for the image vocabulary
        return f"<unused_{i}>"  # vocabulary padding: a model may still sample it


def _append_sat03_pieces(proto) -> None:
    piece = sp_model.ModelProto.SentencePiece
    for name in _SAT03_COMMAND_PIECES:
        proto.pieces.append(piece(piece=name, score=0.0, type=piece.CONTROL))
    for name in ["<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)]:
        proto.pieces.append(piece(piece=name, score=0.0, type=piece.USER_DEFINED))
    proto.trainer_spec.byte_fallback = True
    for byte in range(256):
        proto.pieces.append(piece(piece=f"<0x{byte:02X}>", score=0.0, type=piece.BYTE))


def _encode_whitespace(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def _decode_whitespace(text: str) -> str:
    text = text.replace("<|tab|>", "\t")
    for n in range(2, MAX_BLANK + 1):
        text = text.replace(f"<|blank_{n}|>", " " * n)
    return text

