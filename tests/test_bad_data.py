"""Hostile and broken data files: each gives one `glmc: error:` line naming the file and the
problem, in bounded time and output, and leaves nothing half-written. Every bad file here is
made for real: the bytes of a real shard edited, a real YAML file, a real process killed."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

from glmc.checkpoint import SatCheckpoint
from glmc.checkpoint.verify import verify_shard
from glmc.config import GLMConfig, PRESETS
from glmc.errors import CheckpointError, GlmcError
from glmc.fileio import atomic_directory, parse_yaml, write_text_atomic

SHARD = "1000/mp_rank_00_model_states.pt"
REPO = Path(__file__).parent.parent


def glmc(*args: str | bytes, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmc", *args], capture_output=True, cwd=cwd, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> str:
    """The single stderr line of a refused command; asserts the exit status and that output is small."""
    err = result.stderr.decode("utf-8", errors="replace")
    assert result.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmc: error: "), err[:2000]
    assert "Traceback" not in err and len(result.stderr) < 1000
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of glm-tiny (TP 1, fp32, finite random weights) to damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "model_config.json").read_text())
    for key, value in changes.items():
        if "." in key:  # "glmc.tokenizer" -> config["glmc"]["tokenizer"]
            outer, inner = key.split(".", 1)
            config.setdefault(outer, {})[inner] = value
        else:
            config[key] = value
    (path / "model_config.json").write_text(json.dumps(config))


# --- 1. model_config.json and GLMConfig: types and sizes --------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("num_layers", "3", 'num_layers must be an integer, got "3"'),
    ("num_layers", 3.0, "num_layers must be an integer, got 3.0"),
    ("num_layers", 1e8, "num_layers must be an integer, got 100000000.0"),
    ("hidden_size", True, "hidden_size must be an integer, got true"),
    ("vocab_size", [1024], "vocab_size must be an integer, got [1024]"),
    ("max_sequence_length", None, "max_sequence_length must be an integer, got null"),
    ("inner_hidden_size", "128", 'inner_hidden_size must be an integer, got "128"'),
    ("hidden_size", "64", 'hidden_size must be an integer, got "64"'),  # inner_hidden_size derives from it
    ("num_layers", 100_000_000, "num_layers must lie in [1, 4,096], got 100,000,000"),
    ("max_sequence_length", 70_000, "max_sequence_length must lie in [1, 65,504]"),
    ("layernorm_epsilon", "1e-5", 'layernorm_epsilon must be a number in (0, 1], got "1e-5"'),
    ("layernorm_epsilon", 0, "layernorm_epsilon must be a number in (0, 1], got 0"),
    ("layernorm_order", "x" * 100_000, "layernorm_order=\"xxx"),
    ("glmc.tokenizer", {"model": "../../outside.model"}, "glmc.tokenizer.model must be the name of a file"),
    ("glmc.tokenizer", {"model": "ice_text.model", "text_offset": -5}, "glmc.tokenizer.text_offset must be"),
    ("glmc.special_tokens", {"[MASK]": "150000"}, "glmc.special_tokens.[MASK] must be a token id"),
])
def test_model_config_values_of_the_wrong_type_or_size(ckpt, key, value, message):
    edit_config(ckpt, **{key: value})
    if key == "hidden_size":
        edit_config(ckpt, inner_hidden_size=None)  # SAT's "default": 8/3 of the hidden size
    with pytest.raises(CheckpointError) as error:
        SatCheckpoint.open(ckpt)
    text = str(error.value)
    assert text.startswith(str(ckpt / "model_config.json") + ": ") and message in text, text
    assert len(text) < 400  # a 100,000-character value is quoted cut


@pytest.mark.parametrize("changes", [
    {"num_layers": 4000},  # within the caps, far beyond what the shard holds
    {"num_layers": 4096, "hidden_size": 131072, "num_attention_heads": 1024, "inner_hidden_size": 1 << 20,
     "vocab_size": 1 << 24},  # every cap at once: no size computed from them overflows or takes long
])
def test_a_config_larger_than_its_shard_is_refused_at_once(ckpt, changes):
    edit_config(ckpt, **changes)
    line = one_line_error(glmc("inspect", str(ckpt), timeout=60), f"{ckpt / SHARD}: ",
                          "needs per shard", "the config does not fit these weights")
    need = int(line.split("fewer than the ")[1].split(" ")[0].replace(",", ""))
    config = GLMConfig(**{k: v for k, v in json.loads((ckpt / "model_config.json").read_text()).items()
                          if k in ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size",
                                   "vocab_size", "max_sequence_length")})
    assert need < config.parameter_count() * 2  # a lower bound: int4 matrices, 2-byte vectors
    assert need > (ckpt / SHARD).stat().st_size


def test_the_byte_bound_never_refuses_a_real_shard(tiny_checkpoint, tmp_path):
    from glmc.checkpoint import convert_checkpoint

    # int4 with TP 8 is the smallest a rank's weights get: the bound must still hold.
    convert_checkpoint(SatCheckpoint.open(tiny_checkpoint), tmp_path / "q4", 8, quantization_bits=4)
    assert SatCheckpoint.open(tmp_path / "q4").info.quantization_bits == 4


@pytest.mark.parametrize("field, value", [
    ("num_layers", "3"), ("num_layers", 3.0), ("num_layers", True), ("hidden_size", None),
    ("vocab_size", [1024]), ("rotary_base", 1.5), ("max_sequence_length", False), ("num_layers", 0),
    ("inner_hidden_size", 1 << 40), ("layernorm_epsilon", float("nan")), ("layernorm_epsilon", True),
])
def test_glmconfig_refuses_what_is_not_an_integer_in_range(field, value):
    values = {**PRESETS["glm-tiny"].to_dict(), field: value}
    with pytest.raises(GlmcError, match=rf"^config: {field} must"):
        GLMConfig(**values)
    with pytest.raises(GlmcError, match=rf"^config: {field} must"):
        GLMConfig.from_dict(values)  # as packages build it from their manifest


def test_glmconfig_from_dict_reports_missing_and_unknown_fields():
    values = PRESETS["glm-tiny"].to_dict()
    assert GLMConfig.from_dict(values) == PRESETS["glm-tiny"]
    with pytest.raises(GlmcError, match="config: missing vocab_size"):
        GLMConfig.from_dict({k: v for k, v in values.items() if k != "vocab_size"})
    with pytest.raises(GlmcError, match="config: unknown field"):
        GLMConfig.from_dict({**values, "x" * 10_000: 1})
    with pytest.raises(GlmcError, match="config: expected an object"):
        GLMConfig.from_dict([1, 2])


def test_a_shard_claiming_a_huge_rank_is_refused_at_once(ckpt):
    shutil.copy(ckpt / SHARD, ckpt / "1000/mp_rank_999999999_model_states.pt")
    one_line_error(glmc("inspect", str(ckpt), timeout=60), "shard mp_rank_01_model_states.pt is missing",
                   "found ranks 0, 999999999")


# --- 2. messages that quote file content are bounded -------------------------------------------

def test_a_20_mb_latest_file_is_read_bounded_and_quoted_cut(ckpt):
    (ckpt / "latest").write_bytes(b"9" * 20_000_000)
    line = one_line_error(glmc("inspect", str(ckpt)), f"{ckpt / 'latest'}: 20,000,000 bytes, more than the "
                                                     "iteration name")
    assert len(line) < 400
    os.truncate(ckpt / "latest", 1 << 40)  # a sparse terabyte: only a bounded read survives it
    one_line_error(glmc("inspect", str(ckpt)), "1,099,511,627,776 bytes, more than the iteration name")
    (ckpt / "latest").write_text("x\x00" * 50)
    line = one_line_error(glmc("inspect", str(ckpt)), "expected an iteration name, found 'x\\x00")
    assert len(line) < 400


def test_a_megabyte_key_in_a_shard_is_quoted_cut(ckpt):
    state = torch.load(ckpt / SHARD, weights_only=True)
    state["module"]["transformer." + "k" * 1_000_000] = torch.zeros(1)
    torch.save(state, ckpt / SHARD)
    with pytest.raises(CheckpointError, match="unknown key transformer.kkkk") as error:
        SatCheckpoint.open(ckpt)
    assert len(str(error.value)) < 400


# --- 3. shards read right or refused ------------------------------------------------------------

def record_of(shard: Path, tensor: torch.Tensor) -> zipfile.ZipInfo:
    """The zip record that holds `tensor`'s bytes (found by content, not by torch's naming)."""
    data = tensor.contiguous().numpy().tobytes()
    with zipfile.ZipFile(shard) as archive:
        matches = [i for i in archive.infolist() if i.file_size == len(data) and archive.read(i) == data]
    assert len(matches) == 1
    return matches[0]


def data_offset(shard: Path, info: zipfile.ZipInfo) -> int:
    with open(shard, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def write_crc(shard: Path, info: zipfile.ZipInfo) -> None:
    """Record the CRC-32 of the record's current bytes in its local header and central directory."""
    start = data_offset(shard, info)
    data = bytearray(shard.read_bytes())
    crc = struct.pack("<I", zlib.crc32(data[start:start + info.file_size]))
    data[info.header_offset + 14:info.header_offset + 18] = crc
    name = info.filename.encode()
    central = 0
    while True:
        central = data.find(b"PK\x01\x02", central + 1)
        assert central > 0
        length = struct.unpack("<H", data[central + 28:central + 30])[0]
        if data[central + 46:central + 46 + length] == name:
            break
    data[central + 16:central + 20] = crc
    shard.write_bytes(bytes(data))


def test_nan_and_inf_weights_are_reported_by_inspect_verify(ckpt):
    shard = ckpt / SHARD
    name = "layers.1.attention.dense.weight"
    info = record_of(shard, SatCheckpoint.open(ckpt).load_shard(0)[name])
    start = data_offset(shard, info)
    with open(shard, "r+b") as f:  # fp32 NaN at elements 3 and 10, +inf at 20, -inf at 21
        for index, bits in ((3, 0x7FC00000), (10, 0x7FC00001), (20, 0x7F800000), (21, 0xFF800000)):
            f.seek(start + 4 * index)
            f.write(struct.pack("<I", bits))
    write_crc(shard, info)  # an intact file whose weights are not finite

    SatCheckpoint.open(ckpt)  # structurally valid: only --verify reads every value
    assert glmc("inspect", str(ckpt)).returncode == 0
    result = glmc("inspect", str(ckpt), "--verify", "--json", "--no-progress")
    one_line_error(result, f"{shard}: transformer.{name} holds 4 NaN or infinite values")
    verified = json.loads(result.stdout)["shards"][0]["verify"]
    assert verified["non_finite"] == [{"name": f"transformer.{name}", "count": 4}]
    assert verified["records"] > 0 and verified["records_without_crc"] == 0
    assert verified["tensors"] == len(SatCheckpoint.open(ckpt).load_shard(0))


def test_a_record_with_a_bad_crc_is_refused_by_verify(ckpt):
    shard = ckpt / SHARD
    info = record_of(shard, SatCheckpoint.open(ckpt).load_shard(0)["layers.0.mlp.dense_4h_to_h.weight"])
    offset = data_offset(shard, info) + 1001  # a low mantissa byte: the value stays finite
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    assert glmc("inspect", str(ckpt)).returncode == 0  # memory-mapping never reads the CRC
    one_line_error(glmc("inspect", str(ckpt), "--verify", "--no-progress"),
                   f"{shard}: zip record '{info.filename}' is corrupt: its CRC-32 is")


def test_a_shard_with_compressed_records_is_refused(ckpt):
    shard = ckpt / SHARD
    rezipped = shard.with_name("deflated.zip")
    with zipfile.ZipFile(shard) as source, zipfile.ZipFile(rezipped, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    os.replace(rezipped, shard)
    # torch.load(mmap=True) would read the compressed bytes as weights, silently.
    with pytest.raises(CheckpointError, match=r"zip record '.*' is compressed \(method 8\)"):
        SatCheckpoint.open(ckpt)
    one_line_error(glmc("inspect", str(ckpt)), f"{shard}: zip record", "is compressed")


def test_a_shard_written_without_crcs_verifies_and_says_so(ckpt):
    state = torch.load(ckpt / SHARD, weights_only=True)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(state, ckpt / SHARD)
    finally:
        torch.serialization.set_crc32_options(True)
    result = verify_shard(ckpt / SHARD)
    assert result.records == 0 and result.records_without_crc > 0 and result.non_finite == []


VERIFY_MEMORY = """
import json, sys
from glmc.checkpoint.verify import verify_shard
from glmc.memory import peak_rss_bytes
from pathlib import Path
import glmc.checkpoint.sat  # imports done before measuring
before = peak_rss_bytes()
result = verify_shard(Path(sys.argv[1]))
print(json.dumps({"growth": peak_rss_bytes() - before, "tensors": result.tensors}))
"""


@pytest.mark.slow
def test_verify_streams_a_shard(tmp_path):
    shard = tmp_path / "mp_rank_00_model_states.pt"
    torch.manual_seed(0)
    state = {f"transformer.layers.{i}.w": torch.randn(2048, 2048) for i in range(12)}  # 12 x 16 MiB
    torch.save({"module": state}, shard)
    size = shard.stat().st_size
    del state
    result = subprocess.run([sys.executable, "-c", VERIFY_MEMORY, str(shard)], capture_output=True, text=True,
                            timeout=300, check=True)
    usage = json.loads(result.stdout)
    assert usage["tensors"] == 12
    # A block and its temporaries at a time, never the 192 MiB shard.
    assert usage["growth"] < size / 4, (usage, size)


def test_inspect_verify_on_a_good_checkpoint_and_the_old_option_name(tiny_checkpoint, tmp_path):
    from glmc.checkpoint import convert_checkpoint

    convert_checkpoint(SatCheckpoint.open(tiny_checkpoint), tmp_path / "tp2", 2)
    result = glmc("inspect", str(tmp_path / "tp2"), "--verify")
    assert result.returncode == 0, result.stderr
    progress = result.stderr.decode().strip().splitlines()
    assert [line.split(" (")[0] for line in progress] == [
        f"glmc: verifying {tmp_path / 'tp2' / '1000' / f'mp_rank_0{r}_model_states.pt'}" for r in range(2)]
    assert result.stdout.decode().count("zip records match their CRC-32; 39 weight tensors finite") == 2
    old = glmc("inspect", str(tmp_path / "tp2"), "--verify-weights", "--json", "--no-progress")
    assert old.returncode == 0 and old.stderr == b""
    shards = json.loads(old.stdout)["shards"]
    assert all(s["verify"]["non_finite"] == [] and s["verify"]["records"] > 0 for s in shards)
    assert b"--verify-weights" not in glmc("inspect", "--help").stdout


def test_inspect_verify_checks_every_byte_of_a_package(tiny_package, tmp_path):
    package = Path(shutil.copytree(tiny_package, tmp_path / "pkg"))
    weights = package / "rank0" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 tells
    weights.write_bytes(bytes(data))
    assert glmc("inspect", str(package)).returncode == 0
    one_line_error(glmc("inspect", str(package), "--verify"), "weights.bin")


# --- 5. evaluate: YAML and data files ---------------------------------------------------------------

BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{','.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, message", [
    ("name: t\ntype: mul\npath: mc\n" + BILLION_LAUGHS, "more than 100,000 values once its aliases are expanded"),
    ("name: t\ntype: mul\npath: mc\nname: u\n", "(line 4, column 1): the key 'name' is given twice"),
    ("name: t\ntype: mul\npath: mc\nx: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested deeper than 32 levels"),
    ("name: t\ntype: mul\npath: mc\nx: &x [*x]\n", "an alias refers to a value that contains it"),
    ("name: t\ntype: mul\npath: mc\n" + "# padding\n" * 200_000, "more than the 1,048,576 such a file may hold"),
    ("name: t\ntype: mul\npath: mc\nx: !!python/object/apply:os.system [echo]\n", "could not determine a constructor"),
], ids=["alias-bomb", "duplicate-key", "deep", "recursive-alias", "too-large", "python-tag"])
def test_hostile_task_files_are_one_line(tiny_checkpoint, tmp_path, text, message):
    task = tmp_path / "task.yaml"
    task.write_text(text)
    (tmp_path / "data" / "mc").mkdir(parents=True)
    result = glmc("evaluate", str(task), "--data-path", str(tmp_path / "data"), "--checkpoint",
                  str(tiny_checkpoint), "--output", str(tmp_path / "r.json"), "--no-progress")
    one_line_error(result, f"{task}: ", message)
    assert not (tmp_path / "r.json").exists()


def test_yaml_reader_counts_aliases_without_expanding_them():
    assert parse_yaml("a: &a [1, 2]\nb: [*a, *a]\n", "t") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}
    assert parse_yaml("base: &b {x: 1}\nd:\n  <<: *b\n  x: 2\n", "t")["d"] == {"x": 2}  # merge keys override
    with pytest.raises(GlmcError, match="more than 10 values"):
        parse_yaml("a: &a [1, 2]\nb: [*a, *a, *a, *a]\n", "t", max_nodes=10)


@pytest.mark.parametrize("content, message", [
    ("", "no items (the file is empty"),
    ("\n\n  \n", "no items (the file is empty"),
    ('{"inputs": ' + "[" * 50_000 + "]" * 50_000 + "}\n", "test.jsonl:1: nested deeper than 32 levels"),
    ('{"inputs": [1], "choices": [[3], [4]], "label": 0, "label": 1}\n', "test.jsonl:1: not valid JSON (key 'label' "
                                                                         "given twice)"),
    ('{"inputs": [1], "choices": [[3], [4]], "label": NaN}\n', "test.jsonl:1: not valid JSON (NaN is not JSON)"),
], ids=["empty", "blank-lines", "deep", "duplicate-key", "nan"])
def test_bad_data_files_are_one_line_and_write_no_results(tiny_checkpoint, tmp_path, content, message):
    task = tmp_path / "task.yaml"
    task.write_text("name: t\ntype: mul\npath: mc\n")
    (tmp_path / "data" / "mc").mkdir(parents=True)
    (tmp_path / "data" / "mc" / "test.jsonl").write_text(content)
    result = glmc("evaluate", str(task), "--data-path", str(tmp_path / "data"), "--checkpoint",
                  str(tiny_checkpoint), "--output", str(tmp_path / "r.json"), "--no-progress")
    one_line_error(result, message)
    assert not (tmp_path / "r.json").exists()


def test_a_metric_that_is_nan_is_written_as_null(tiny_checkpoint, tmp_path):
    (tmp_path / "nanmetric.py").write_text(textwrap.dedent("""
        from glmc.evaluation import register_metric
        register_metric("Undefined")(lambda predictions, examples: float("nan"))
    """))
    task = tmp_path / "task.yaml"
    task.write_text("name: t\ntype: mul\npath: mc\nmetrics: [Accuracy, Undefined]\n")
    (tmp_path / "data" / "mc").mkdir(parents=True)
    (tmp_path / "data" / "mc" / "test.jsonl").write_text('{"inputs": [1, 2], "choices": [[3], [4]], "label": 0}\n')
    result = glmc("evaluate", str(task), "--data-path", str(tmp_path / "data"), "--checkpoint", str(tiny_checkpoint),
                  "--output", str(tmp_path / "r.json"), "--no-progress", "--import", "nanmetric", cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    def strict(constant):
        raise ValueError(f"{constant} in the results")

    document = json.loads((tmp_path / "r.json").read_text(), parse_constant=strict)
    file = document["tasks"][0]["groups"]["all"]["files"]["test.jsonl"]["metrics"]
    assert file["Undefined"] is None and math.isfinite(file["Accuracy"])
    assert "Undefined = null" in result.stdout.decode()


def test_text_that_is_not_unicode_in_a_data_file_names_the_line(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text("name: t\ntype: mul\npath: mc\n")
    (tmp_path / "data" / "mc").mkdir(parents=True)
    line = '{"inputs_pretokenized": "x\\ud800", "choices_pretokenized": ["a", "b"], "label": 0}\n'
    (tmp_path / "data" / "mc" / "test.jsonl").write_text("\n" + line)
    result = glmc("evaluate", str(task), "--data-path", str(tmp_path / "data"), "--output", str(tmp_path / "r.json"),
                  "--no-progress")  # the embedded model: it has a tokenizer
    one_line_error(result, "test.jsonl:2: 'inputs_pretokenized'", "lone surrogate")


# --- 6. train: options, and runs that die ------------------------------------------------------------

@pytest.mark.parametrize("option, value", [
    ("min_lr_ratio", float("nan")), ("min_lr_ratio", 1.5), ("weight_decay", float("inf")), ("grad_clip", 0.0),
    ("grad_clip", float("nan")), ("embedding_grad_scale", 2.0), ("betas", (0.9, float("nan"))), ("betas", (0.9, 1.0)),
    ("lr", float("-inf")), ("steps", 0), ("batch_size", True), ("warmup_steps", 0),
])
def test_train_options_refuse_values_outside_their_range(option, value):
    from glmc.train import TrainOptions

    with pytest.raises(GlmcError, match=f"training option {option} must"):
        TrainOptions(**{"steps": 10, option: value})


@pytest.mark.parametrize("extra, fragment", [
    (["--embedding-grad-scale", "2"], "--embedding-grad-scale"),
    (["--lr", "inf"], "'inf' is not a finite number"),
    (["--lr", "0"], "--lr"),
])
def test_train_refuses_float_options_outside_their_range(tmp_path, extra, fragment):
    result = glmc("train", "--data", str(tmp_path / "none.txt"), "--steps", "1", "--out", str(tmp_path / "out"),
                  *extra)
    one_line_error(result, fragment, code=2)
    assert not (tmp_path / "out").exists()


CORPUS = "".join(r + "\n%\n" for r in ["The cat sat on the mat and looked at the moon.", "床前明月光，疑是地上霜。",
                                       "A stitch in time saves nine."] * 20)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


# Runs `glmc train` in this process, killing it (SIGKILL: no cleanup runs) at a chosen moment.
KILLED_RUN = """
import os, signal, sys
import glmc.train.trainer as trainer
from glmc.cli import main

when, args = sys.argv[1], sys.argv[2:]
if when == "step":  # during the first step, before any save
    def batch_loss(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    trainer.batch_loss = batch_loss
else:  # while writing the shard of save number `when`
    saves = []
    real = trainer.save_shard
    def save_shard(path, state):
        saves.append(path)
        if len(saves) == int(when):
            real(path, state)  # the shard is whole, the iteration folder not yet renamed into place
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, state)
    trainer.save_shard = save_shard
sys.exit(main(args))
"""


def killed_run(when: str, args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", KILLED_RUN, when, *args], capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr


def test_a_run_that_diverges_stops_with_one_line(tokenizer_8k, corpus, tmp_path):
    from glmc.train import TrainOptions, train

    config = GLMConfig(num_layers=1, hidden_size=64, num_attention_heads=4, inner_hidden_size=128, vocab_size=8192,
                       max_sequence_length=64)
    with pytest.raises(GlmcError, match=r"step \d+: the training loss is nan \(the run diverged\)"):
        train(config, tokenizer_8k, [corpus], tmp_path / "out",
              TrainOptions(steps=10, batch_size=2, seq_len=32, lr=1e30, warmup_steps=1))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tokenizer_8k():
    from glmc.api import EMBEDDED_DEFAULT
    from glmc.tokenizer import IceTokenizer

    return IceTokenizer(EMBEDDED_DEFAULT / "ice_text.model", text_offset=0)


def test_a_batch_larger_than_memory_is_refused_before_any_work(corpus, tmp_path):
    result = glmc("train", "--config", "glm-demo", "--data", str(corpus), "--steps", "1", "--batch-size", "1000000000",
                  "--out", str(tmp_path / "out"), "--no-progress", timeout=60)
    one_line_error(result, "--batch-size 1000000000 x --seq-len 256 needs at least", "lower --batch-size")
    assert not (tmp_path / "out").exists()


def test_a_run_killed_before_its_first_save_leaves_an_out_both_modes_accept(corpus, tmp_path):
    out = tmp_path / "out"
    args = ["train", "--config", "glm-demo", "--data", str(corpus), "--steps", "2", "--batch-size", "2",
            "--seq-len", "32", "--out", str(out), "--no-progress", "--json"]
    killed_run("step", args)
    assert not out.exists()  # made at the first save
    one_line_error(glmc(*args, "--resume"), f"--resume: {out} holds no checkpoint to resume")
    # What earlier versions left at the start of a run: accepted by a new run.
    out.mkdir()
    (out / "model_config.json").write_text("{}")
    (out / "ice_text.model").write_bytes(b"")
    one_line_error(glmc(*args, "--resume"), "holds no checkpoint to resume")
    result = glmc(*args)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2 and (out / "latest").read_text() == "2"


def test_a_run_killed_while_saving_is_resumed_or_restarted_and_its_partial_folder_removed(corpus, tmp_path):
    out = tmp_path / "out"
    args = ["train", "--config", "glm-demo", "--data", str(corpus), "--steps", "4", "--batch-size", "2",
            "--seq-len", "32", "--save-interval", "2", "--out", str(out), "--no-progress", "--json"]
    killed_run("1", args)  # during the first save (step 2)
    partials = [p.name for p in out.iterdir() if ".partial-" in p.name]
    assert len(partials) == 1 and partials[0].startswith(".2.partial-") and not (out / "latest").exists()
    one_line_error(glmc(*args, "--resume"), "holds no checkpoint to resume")
    result = glmc(*args)  # a new run accepts it, and the dead writer's folder goes
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["4", "ice_text.model", "latest", "model_config.json"]

    shutil.rmtree(out)
    killed_run("2", args)  # during the second save (step 4): step 2's checkpoint stands
    assert (out / "latest").read_text() == "2" and any(".4.partial-" in p.name for p in out.iterdir())
    resumed = glmc(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in out.iterdir()) == ["4", "ice_text.model", "latest", "model_config.json"]


def test_an_out_with_a_live_writer_or_foreign_files_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64]  # as temporaries record it
    live = out / f".2.partial-{os.getpid()}@{host}+abc"  # this test process: alive
    live.mkdir()
    args = ["train", "--config", "glm-demo", "--data", str(corpus), "--steps", "1", "--out", str(out), "--no-progress"]
    one_line_error(glmc(*args), f"process {os.getpid()} on {host} is writing into it")
    live.rmdir()
    (out / "notes.txt").write_text("mine")
    one_line_error(glmc(*args), "already holds files that are not a glmc train run (notes.txt)")
    assert (out / "notes.txt").read_text() == "mine"


# Enters a temporary write and dies there (SIGKILL), as a killed export, convert or save would.
KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from glmc import fileio
kind, target = sys.argv[1], Path(sys.argv[2])
if kind == "directory":
    with fileio.atomic_directory(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
elif kind == "text":
    real = os.replace
    os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    fileio.write_text_atomic(target, "half")
else:
    import torch
    from glmc.checkpoint.sat import save_shard
    os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    save_shard(target, {"w": torch.zeros(3)})
"""

LIVE_WRITER = """
import sys
from pathlib import Path
from glmc import fileio
with fileio.atomic_directory(Path(sys.argv[1])) as tmp:
    print(tmp.name, flush=True)
    sys.stdin.readline()  # holds the temporary folder until told to finish
"""


def kill_a_writer(kind: str, target: Path) -> list[str]:
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, kind, str(target)], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "pkg"
    left = kill_a_writer("directory", target)
    assert len(left) == 1 and left[0].startswith(".pkg.partial-")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60, check=True)
    # Another machine's writer: its pid means nothing here, even one that is no process on this one.
    elsewhere = tmp_path / f".pkg.partial-{int(gone.stdout)}@another-host+abc"
    elsewhere.mkdir()
    live = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        live_name = live.stdout.readline().strip()
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "done").write_text("ok")
        names = {p.name for p in tmp_path.iterdir()}
        assert left[0] not in names  # the killed writer's folder is gone
        assert live_name in names and elsewhere.name in names  # the live writer's and the foreign one stay
        assert (target / "done").read_text() == "ok"
    finally:
        live.communicate("\n", timeout=60)
    assert live.returncode == 0 and target.is_dir() and not (target / "done").exists()  # it finished, last

    text = tmp_path / "results.json"
    left = kill_a_writer("text", text)
    assert len(left) == 1 and left[0].startswith(".results.json.tmp-")
    write_text_atomic(text, "whole")
    assert text.read_text() == "whole" and not (tmp_path / left[0]).exists()

    shard = tmp_path / "1" / "mp_rank_00_model_states.pt"
    left = kill_a_writer("shard", shard)
    assert len(left) == 1 and ".tmp-" in left[0]
    from glmc.checkpoint.sat import save_shard

    save_shard(shard, {"w": torch.ones(3)})
    assert [p.name for p in shard.parent.iterdir()] == [shard.name]


# --- 7. the tokenizer: text that is not Unicode -------------------------------------------------------

def test_a_prompt_argument_that_is_not_utf8_is_one_line():
    result = glmc("run", "--no-output-files", "--out-seq-length", "12", b"caf\xe9 [MASK]")
    one_line_error(result, "lone surrogate")
