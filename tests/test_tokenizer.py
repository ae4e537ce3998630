"""The icetk-compatible tokenizer, against sentencepiece itself and icetk's own outputs."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from conftest import DATA
from glmc.api import EMBEDDED_DEFAULT
from glmc.errors import GlmcError
from glmc.tokenizer import GLM130B_SPECIAL_TOKENS, IceTokenizer

MODEL = EMBEDDED_DEFAULT / "ice_text.model"
GOLDENS = DATA / "icetk" / "goldens.json"


@pytest.fixture(scope="module")
def icetk_layout():
    """Our small model in GLM-130B's id layout: text at 20000+, commands at 150000+."""
    return IceTokenizer(MODEL, text_offset=20000, command_base=150000)


@pytest.fixture(scope="module")
def raw_sp():
    return spm.SentencePieceProcessor(model_file=str(MODEL))


def test_ids_are_sentencepiece_ids_offset_by_the_image_vocabulary(icetk_layout, raw_sp):
    text = "Tsinghua University 清华大学 is in Beijing."
    assert icetk_layout.tokenize(text) == [i + 20000 for i in raw_sp.EncodeAsIds(text)]


def test_command_ids_and_eos(icetk_layout):
    assert icetk_layout.special == GLM130B_SPECIAL_TOKENS
    assert [icetk_layout.get_command(n) for n in ("[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop")] == \
        [150000, 150001, 150002, 150003, 150004, 150005]
    assert icetk_layout.get_command("eos") == 20002


def test_compact_layout_puts_commands_after_the_text_pieces(raw_sp):
    tok = IceTokenizer(MODEL, text_offset=0)
    assert tok.special.mask == raw_sp.get_piece_size() and tok.special.eos == 2


def test_whitespace_is_left_to_the_normaliser(icetk_layout):
    assert icetk_layout.tokenize("one\ntwo\t\tthree    four") == icetk_layout.tokenize("one two three four")


def test_detokenize_splits_at_commands(icetk_layout, raw_sp):
    a, b = icetk_layout.tokenize("Hello world"), icetk_layout.tokenize("again")
    ids = a + [150000] + b + [150004, 20002]
    # SAT prints `[name]`, and the mask commands' names carry their own brackets.
    assert icetk_layout.detokenize(ids) == "Hello world[[MASK]]again[sop][</s>]"
    newline = raw_sp.PieceToId("<n>") + 20000  # the `<n>` piece decodes to a newline
    assert icetk_layout.detokenize(a + [newline] + b) == "Hello world\n again"


def test_non_text_ids_print_by_name(icetk_layout):
    assert icetk_layout.detokenize([5, 150007, 150100]) == "<image_5>[dBLOCK]<unused_150100>"


def test_sat03_variant_keeps_whitespace_and_rare_characters():
    tok = IceTokenizer(MODEL, text_offset=20000, variant="sat-0.3")
    text = "def f():\n\treturn  1    # 🙂 Ж"
    assert tok.decode_text(tok.tokenize(text)) == text
    assert tok.special.mask == 20000 + tok.num_text_pieces  # appended pieces follow the model's own


def test_missing_model_says_where_to_put_it(tmp_path):
    with pytest.raises(GlmcError, match=r"tokenizer model not found\. glmc never downloads it.*ice_text\.model"):
        IceTokenizer(tmp_path / "ice_text.model")


def test_file_that_is_not_a_sentencepiece_model(tmp_path):
    bad = tmp_path / "ice_text.model"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(GlmcError, match="not a SentencePiece model"):
        IceTokenizer(bad)


def test_unknown_variant():
    with pytest.raises(GlmcError, match="unknown tokenizer variant 'sat-9'"):
        IceTokenizer(MODEL, variant="sat-9")


# --- against icetk and SAT themselves (tools/icetk_goldens.py) ------------------------------

def goldens() -> dict:
    return json.loads(GOLDENS.read_text(encoding="utf-8"))


needs_goldens = pytest.mark.skipif(not GOLDENS.exists(), reason="icetk goldens not generated")


@needs_goldens
def test_tokenize_matches_sat_0212_with_icetk(icetk_layout):
    data = goldens()
    for case in data["cases"]:
        assert icetk_layout.tokenize(case["text"]) == case["sat0212_tokenize"], repr(case["text"])
        assert icetk_layout.detokenize(case["sat0212_tokenize"]) == case["sat0212_detokenize"], repr(case["text"])


@needs_goldens
def test_detokenize_matches_sat_0212(icetk_layout):
    for case in goldens()["detokenize_cases"]:
        assert icetk_layout.detokenize(case["ids"]) == case["sat0212_detokenize"], case["ids"]


@needs_goldens
def test_sat03_variant_matches_glm130b_tokenizer():
    tok = IceTokenizer(MODEL, text_offset=20000, variant="sat-0.3")
    for case in goldens()["cases"]:
        assert tok.tokenize(case["text"]) == case["sat03_encode"], repr(case["text"])
        assert tok.decode_text(case["sat03_encode"]) == case["sat03_decode"], repr(case["text"])


# --- SAT >= 0.3's detokenize, and text that is not Unicode -------------------------------------

def test_sat03_detokenize_prints_its_whitespace_commands():
    # SAT >= 0.3's _IceTokenizer registers `<t>` and `<blank_2>`..`<blank_80>` as commands after the
    # eight (150008..150087 in GLM-130B's layout) and prints each as `[name]`.
    tok = IceTokenizer(MODEL, text_offset=20000, command_base=150000, variant="sat-0.3")
    hello = tok.tokenize("Hello world")
    assert tok.detokenize([150008, 150009, 150087]) == "[<t>][<blank_2>][<blank_80>]"
    assert tok.detokenize(hello + [150008] + hello + [150004]) == "Hello world[<t>]Hello world[sop]"
    assert tok.detokenize([150088]) == "<unused_150088>"  # past the last one
    # With the commands right after the text pieces (GLM-130B: 130,000 pieces, commands at 150000),
    # the appended `<|tab|>` and blank pieces take exactly those ids, so SAT prints them as commands.
    compact = IceTokenizer(MODEL, text_offset=20000, variant="sat-0.3")
    ids = compact.tokenize("a\tb  c")
    assert compact.special.mask + 8 in ids and compact.special.mask + 9 in ids
    assert compact.detokenize(ids) == "a[<t>]b[<blank_2>]c"
    assert compact.decode_text(ids) == "a\tb  c"  # the pieces themselves decode to whitespace
    assert tok.detokenize(tok.tokenize("a\tb")) == "a\tb"  # elsewhere they are text
    icetk = IceTokenizer(MODEL, text_offset=20000, command_base=150000)  # SAT 0.2.12 has no such commands
    assert icetk.detokenize([150008]) == "<unused_150008>"


@pytest.mark.parametrize("variant", ["icetk", "sat-0.3"])
def test_text_that_is_not_unicode_is_one_error(variant):
    tok = IceTokenizer(MODEL, text_offset=20000, variant=variant)
    with pytest.raises(GlmcError, match=r"U\+D800 at character 1, a lone surrogate"):
        tok.tokenize("x\ud800y")
    # What Python makes of a command-line argument that is not UTF-8.
    with pytest.raises(GlmcError, match=r"U\+DCFF at character 3"):
        tok.tokenize(b"caf\xff".decode("utf-8", "surrogateescape"))


def test_nul_is_text_as_icetk_reads_it(icetk_layout, raw_sp):
    # icetk's model has no piece for NUL: it is read as <unk> (piece 0), as icetk itself reads it.
    ids = icetk_layout.tokenize("a\x00b")
    assert ids == [i + 20000 for i in raw_sp.EncodeAsIds("a\x00b")] and 20000 + raw_sp.unk_id() in ids
    sat = IceTokenizer(MODEL, text_offset=20000, variant="sat-0.3")
    assert sat.decode_text(sat.tokenize("a\x00b")) == "a\x00b"  # byte fallback: the piece <0x00>
