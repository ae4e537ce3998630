"""SAT checkpoints: resharding, quantization, validation and streaming memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAT_ORACLE, SAT_TINY
from glmc.checkpoint import SatCheckpoint, convert_checkpoint, load_model, model_state, save_checkpoint
from glmc.checkpoint.layout import Copy, _block_copies
from glmc.checkpoint.sat import save_shard
from glmc.config import PRESETS, GLMConfig, Mapping
from glmc.errors import CheckpointError, GlmcError
from glmc.model import GLMModel
from glmc.quantization import dequantize, pack_int4, quantize, unpack_int4


def shard(path: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return SatCheckpoint.open(path).load_shard(rank)


def manual_split(full: dict[str, torch.Tensor], tp: int, rank: int, inner: int) -> dict[str, torch.Tensor]:
    """The facts page's table, written out by hand."""
    out = {}
    for name, t in full.items():
        if name == "word_embeddings.weight" or "query_key_value" in name:
            out[name] = t.chunk(tp, 0)[rank]
        elif "dense_h_to_4h" in name:
            x1, x2 = t[:inner], t[inner:]
            out[name] = torch.cat([x1.chunk(tp, 0)[rank], x2.chunk(tp, 0)[rank]])
        elif name.endswith("attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
            out[name] = t.chunk(tp, 1)[rank]
        else:
            out[name] = t
    return out


def test_round_trip_1_2_4_8_1_is_bit_exact(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint
    for tp in (2, 4, 8, 1):
        out = tmp_path / f"tp{tp}"
        convert_checkpoint(SatCheckpoint.open(path), out, tp)
        assert SatCheckpoint.open(out).tp_size == tp
        path = out
    original, back = shard(tiny_checkpoint), shard(path)
    assert original.keys() == back.keys()
    for name in original:
        assert torch.equal(original[name], back[name]), name


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_shards_follow_the_split_table(tiny_checkpoint, tmp_path, tp):
    convert_checkpoint(SatCheckpoint.open(tiny_checkpoint), tmp_path / "out", tp)
    full = shard(tiny_checkpoint)
    for rank in range(tp):
        expected = manual_split(full, tp, rank, PRESETS["glm-tiny"].inner_hidden_size)
        got = shard(tmp_path / "out", rank)
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), (rank, name)


def test_any_source_to_any_target(tiny_checkpoint, tmp_path):
    ckpt = SatCheckpoint.open(tiny_checkpoint)
    convert_checkpoint(ckpt, tmp_path / "tp8", 8)
    convert_checkpoint(SatCheckpoint.open(tmp_path / "tp8"), tmp_path / "tp2", 2)
    convert_checkpoint(ckpt, tmp_path / "tp2-direct", 2)
    for rank in range(2):
        a, b = shard(tmp_path / "tp2", rank), shard(tmp_path / "tp2-direct", rank)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_copy_plan_for_degrees_that_do_not_nest():
    # 12 rows from 3 source ranks into 4 target ranks: target 1 = rows 3..5 = src 0 row 3, src 1 rows 0-1.
    assert _block_copies(12, 3, 4, 1) == [Copy(0, 3, 0, 1), Copy(1, 0, 1, 2)]
    assert _block_copies(12, 4, 3, 2) == [Copy(2, 2, 0, 1), Copy(3, 0, 1, 3)]


def test_model_of_any_rank_layout_gives_the_same_logits(tiny_checkpoint, tmp_path):
    convert_checkpoint(SatCheckpoint.open(tiny_checkpoint), tmp_path / "tp8", 8)
    tokens = torch.tensor([[5, 17, 300, 1001, 1004, 42]])
    positions = torch.arange(6)[None]
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    with torch.no_grad():
        a = load_model(SatCheckpoint.open(tiny_checkpoint))(tokens, positions, mask).logits
        b = load_model(SatCheckpoint.open(tmp_path / "tp8"))(tokens, positions, mask).logits
    assert torch.equal(a, b)


# --- quantization ---------------------------------------------------------------------------

def test_int4_packing_is_the_cuda_kernels():
    q = torch.randint(-7, 8, (5, 12), dtype=torch.int8)
    packed = pack_int4(q)
    qn = q.numpy().astype(np.int16)
    expected = ((qn[:, 0::2] << 4) | (qn[:, 1::2] & 0x0F)).astype(np.uint8).view(np.int8)
    assert np.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_loads_to_scale_times_q(tiny_checkpoint, tmp_path, bits):
    convert_checkpoint(SatCheckpoint.open(tiny_checkpoint), tmp_path / "q", 2, quantization_bits=bits)
    ckpt = SatCheckpoint.open(tmp_path / "q")
    assert ckpt.info.quantization_bits == bits and ckpt.tp_size == 2
    stored = ckpt.load_shard(1)
    model = load_model(ckpt, Mapping(2, 1))
    for name in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
        codes = stored[f"layers.1.{name}.weight"].numpy().astype(np.int16)
        if bits == 4:  # high nibble first, sign-extended, independently of glmc.quantization
            high = (codes >> 4).astype(np.int8)
            low = ((codes << 4).astype(np.int8) >> 4).astype(np.int8)
            codes = np.stack([high, low], -1).reshape(codes.shape[0], -1)
        scale = stored[f"layers.1.{name}.weight_scale"].numpy()
        expected = (codes.astype(np.float16) * scale[:, None]).astype(np.float32)
        module = model.get_submodule(f"layers.1.{name}")
        assert np.array_equal(module.dense_weight().detach().numpy(), expected), name


def test_quantize_follows_glm130b(tiny_model):
    w = tiny_model.layers[0].attention.dense.weight.detach().half()
    q, scale = quantize(w, 8)
    expected_scale = (w.float().abs().max(-1).values / 127).half()  # computed as GLM-130B, in fp16
    assert torch.equal(scale, (w.abs().max(-1).values / 127).half())
    assert torch.allclose(scale.float(), expected_scale.float(), rtol=1e-3)
    assert torch.equal(q, torch.round(w / scale[:, None]).to(torch.int8))
    assert (dequantize(q, scale, 8).float() - w.float()).abs().max() <= scale.float().max() / 2 + 1e-3


def test_quantized_checkpoint_refuses_an_inexact_merge(tiny_checkpoint, tmp_path):
    """Quantized at TP 2, the row-parallel matrices have a scale per rank: one row cannot hold two."""
    convert_checkpoint(SatCheckpoint.open(tiny_checkpoint), tmp_path / "q", 2, quantization_bits=8)
    with pytest.raises(CheckpointError, match="dense.weight_scale differs from source rank 0's"):
        load_model(SatCheckpoint.open(tmp_path / "q"), Mapping(1, 0))


@pytest.mark.skipif(not (SAT_ORACLE / "cases.json").exists(), reason="SAT oracle data not generated")
@pytest.mark.parametrize("case,tp,bits", [("convert_tp2", 2, None), ("convert_tp4", 4, None),
                                          ("convert_int8_tp1", 1, 8), ("convert_int8_tp2", 2, 8)])
def test_convert_matches_glm130b_convert_tp(tmp_path, case, tp, bits):
    golden = np.load(SAT_ORACLE / f"{case}.npz")
    convert_checkpoint(SatCheckpoint.open(SAT_TINY / "checkpoint"), tmp_path / "out", tp, quantization_bits=bits)
    for rank in range(tp):
        ours = shard(tmp_path / "out", rank)
        keys = [k for k in golden.files if k.startswith(f"rank{rank}/")]
        assert len(keys) == len(ours)
        for key in keys:
            name = key.split("/", 1)[1].removeprefix("transformer.")
            assert np.array_equal(ours[name].numpy(), golden[key]), key


# --- bad input ------------------------------------------------------------------------------

def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard(tiny_checkpoint, tmp_path):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    f = path / "1000/mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: cannot read the shard, truncated"):
        SatCheckpoint.open(path)


def test_missing_latest(tiny_checkpoint, tmp_path):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    (path / "latest").unlink()
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        SatCheckpoint.open(path)


def test_latest_names_a_missing_iteration(tiny_checkpoint, tmp_path):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    (path / "latest").write_text("49300")
    with pytest.raises(CheckpointError, match=r"49300: no such directory \(named by .*latest\)"):
        SatCheckpoint.open(path)


def test_missing_shard_rank(tiny_checkpoint, tmp_path):
    convert_checkpoint(SatCheckpoint.open(tiny_checkpoint), tmp_path / "tp4", 4)
    (tmp_path / "tp4/1000/mp_rank_02_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_02_model_states.pt is missing"):
        SatCheckpoint.open(tmp_path / "tp4")


def test_shards_of_different_tp_layouts(tiny_checkpoint, tmp_path):
    ckpt = SatCheckpoint.open(tiny_checkpoint)
    convert_checkpoint(ckpt, tmp_path / "tp2", 2)
    convert_checkpoint(ckpt, tmp_path / "tp4", 4)
    shutil.copy(tmp_path / "tp4/1000/mp_rank_01_model_states.pt", tmp_path / "tp2/1000/mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointError, match=r"mp_rank_01_model_states\.pt: transformer\.word_embeddings\.weight "
                                              r"has shape \[256, 64\], expected \[512, 64\]"):
        SatCheckpoint.open(tmp_path / "tp2")


def test_shards_of_different_quantization(tiny_checkpoint, tmp_path):
    ckpt = SatCheckpoint.open(tiny_checkpoint)
    convert_checkpoint(ckpt, tmp_path / "tp2", 2)
    convert_checkpoint(ckpt, tmp_path / "q", 2, quantization_bits=8)
    shutil.copy(tmp_path / "q/1000/mp_rank_01_model_states.pt", tmp_path / "tp2/1000/mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointError, match="shards differ in layout: .*no quantization.*int8"):
        SatCheckpoint.open(tmp_path / "tp2")


def _edit_shard(path: Path, edit) -> None:
    f = path / "1000/mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=True)["module"]
    edit(state)
    torch.save({"module": state}, f)


def test_weight_that_does_not_fit_the_config(tiny_checkpoint, tmp_path):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    key = "transformer.layers.1.mlp.dense_4h_to_h.weight"
    _edit_shard(path, lambda s: s.__setitem__(key, s[key][:, :100].clone()))
    with pytest.raises(CheckpointError, match=rf"{key} has shape \[64, 100\], expected \[64, 128\]"):
        SatCheckpoint.open(path)


def test_missing_and_unknown_keys(tiny_checkpoint, tmp_path):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    _edit_shard(path, lambda s: s.pop("transformer.layers.2.attention.dense.bias"))
    with pytest.raises(CheckpointError, match=r"missing transformer\.layers\.2\.attention\.dense\.bias"):
        SatCheckpoint.open(path)
    path = copy_ckpt(tiny_checkpoint, tmp_path / "d")
    _edit_shard(path, lambda s: s.__setitem__("transformer.layers.3.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unknown key transformer\.layers\.3\.extra\.weight"):
        SatCheckpoint.open(path)


def test_rotary_inv_freq_is_ignored(tiny_checkpoint, tmp_path):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    _edit_shard(path, lambda s: s.__setitem__("transformer.layers.0.attention.rotary_emb.inv_freq",
                                              torch.ones(4, dtype=torch.half)))
    assert "layers.0.attention.rotary_emb.inv_freq" not in SatCheckpoint.open(path).load_shard(0)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tiny_checkpoint, tmp_path):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    marker = tmp_path / "pwned"
    f = path / "1000/mp_rank_00_model_states.pt"
    # The real weights (the file is as large as the config needs) with a payload beside them.
    torch.save({"module": torch.load(f, weights_only=True)["module"], "x": _RunsCode(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refused to load: the pickle holds more than tensors"):
        SatCheckpoint.open(path)
    assert not marker.exists()


def test_legacy_non_zip_shard_loads_without_mmap(tiny_checkpoint, tmp_path):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    f = path / "1000/mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=True)
    torch.save(state, f, _use_new_zipfile_serialization=False)
    assert torch.equal(SatCheckpoint.open(path).load_shard(0)["word_embeddings.weight"],
                       state["module"]["transformer.word_embeddings.weight"])


def test_config_is_inferred_from_presets_or_asked_for(tiny_checkpoint, tmp_path):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    (path / "model_config.json").unlink()
    assert SatCheckpoint.open(path).config == PRESETS["glm-tiny"]
    odd = tmp_path / "odd"
    config = GLMConfig(num_layers=1, hidden_size=32, num_attention_heads=4, inner_hidden_size=64,
                       vocab_size=128, max_sequence_length=16)
    save_checkpoint(odd, config, [model_state(GLMModel(config))])
    (odd / "model_config.json").unlink()
    with pytest.raises(CheckpointError, match="match no preset; pass --config"):
        SatCheckpoint.open(odd)


def test_convert_writes_nothing_when_it_fails(tiny_checkpoint, tmp_path, monkeypatch):
    import glmc.checkpoint.convert as convert_module

    calls = []

    def failing_save(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save_shard(path, state)

    monkeypatch.setattr(convert_module, "save_shard", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(SatCheckpoint.open(tiny_checkpoint), tmp_path / "out", 2)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder remains


def test_convert_refuses_to_overwrite_without_force(tiny_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/keep.txt").write_text("mine")
    with pytest.raises(GlmcError, match="already exists"):
        convert_checkpoint(SatCheckpoint.open(tiny_checkpoint), tmp_path / "out", 2)
    assert (tmp_path / "out/keep.txt").read_text() == "mine"
    convert_checkpoint(SatCheckpoint.open(tiny_checkpoint), tmp_path / "out", 2, overwrite=True)
    assert SatCheckpoint.open(tmp_path / "out").tp_size == 2 and not (tmp_path / "out/keep.txt").exists()


# --- memory ---------------------------------------------------------------------------------

PEAK_SCRIPT = """
import json, sys
from glmc.checkpoint import SatCheckpoint, convert_checkpoint
from glmc.memory import peak_rss_bytes
ckpt = SatCheckpoint.open(sys.argv[1])
before = peak_rss_bytes()
convert_checkpoint(ckpt, sys.argv[2], int(sys.argv[3]))
print(json.dumps({"before": before, "peak": peak_rss_bytes()}))
"""


@pytest.mark.slow
def test_convert_peak_memory_stays_near_one_target_rank(tmp_path):
    # ~420 MB of fp32 weights, dominated by a GLM-130B-sized vocabulary.
    config = GLMConfig(num_layers=8, hidden_size=512, num_attention_heads=8, inner_hidden_size=1368,
                       vocab_size=150528, max_sequence_length=64)
    model = GLMModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    save_checkpoint(tmp_path / "src", config, [model_state(model)])
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    del model
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "src"), str(tmp_path / "dst"), "4"],
                            capture_output=True, text=True, check=True)
    usage = json.loads(result.stdout)
    growth = usage["peak"] - usage["before"]
    rank_bytes = model_bytes / 4
    print(f"model {model_bytes / 2**20:.0f} MiB, target rank {rank_bytes / 2**20:.0f} MiB, "
          f"peak growth {growth / 2**20:.0f} MiB")
    # One target rank plus one group of source pages (here the vocabulary slice, 0.19 of the
    # model), far from the whole model; the heap a finished rank leaves is handed back.
    assert growth < rank_bytes + 0.2 * model_bytes, (growth, model_bytes)
    assert SatCheckpoint.open(tmp_path / "dst").tp_size == 4


TRIM_SCRIPT = """
import json, sys, torch
from glmc.memory import return_freed_memory, rss_bytes
before = rss_bytes()
blocks = [torch.ones(6400) for _ in range(4000)]  # 25 KiB each, 100 MiB: below malloc's mmap threshold
keep = torch.ones(6400)  # above them on the heap: the heap's top cannot shrink past it
del blocks
held = rss_bytes() - before
if sys.argv[1] == "trim":
    return_freed_memory()
print(json.dumps({"held": held, "after": rss_bytes() - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_freed_heap_memory_is_handed_back():
    """What convert does between target ranks: freed tensors below a live one stay resident in
    glibc's heap until handed back."""
    usage = {}
    for mode in ("keep", "trim"):
        result = subprocess.run([sys.executable, "-c", TRIM_SCRIPT, mode], capture_output=True, text=True,
                                check=True, timeout=120)
        usage[mode] = json.loads(result.stdout)
    assert usage["keep"]["held"] > 80 * 2**20 and usage["keep"]["after"] > 80 * 2**20  # glibc keeps them
    assert usage["trim"]["held"] > 80 * 2**20 and usage["trim"]["after"] < 20 * 2**20


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ('{"num_layers": 3}', "missing hidden_size"),
    ('{"num_layers": 3, "hidden_size": 64, "num_attention_heads": 8, "vocab_size": 1024, '
     '"max_sequence_length": 128, "layernorm_order": "pre"}', "post-LayerNorm"),
    ('{"num_layers": 3, "hidden_size": 64, "num_attention_heads": 7, "vocab_size": 1024, '
     '"max_sequence_length": 128}', "not a multiple of num_attention_heads"),
])
def test_bad_model_config(tiny_checkpoint, tmp_path, content, message):
    path = copy_ckpt(tiny_checkpoint, tmp_path / "c")
    (path / "model_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"model_config\.json: .*{message}"):
        SatCheckpoint.open(path)
