"""The `glmc` command line: help, the embedded model, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glmc.checkpoint import SatCheckpoint
from glmc.cli import main


def glmc(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmc", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> None:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmc: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("command", [[], ["run"], ["convert"], ["inspect"]])
def test_help_is_complete(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: glmc" in out
    if command == ["run"]:
        for option in ("--input-source", "--with-id", "--output-path", "--out-seq-length", "--min-gen-length",
                       "--sampling-strategy", "--top-k", "--top-p", "--temperature", "--num-beams",
                       "--length-penalty", "--no-repeat-ngram-size", "--print-all-beams", "--seed", "--dtype",
                       "--device", "--checkpoint", "--backend", "--json"):
            assert option in out, option


def test_run_embedded_model_prints_and_writes_files(tmp_path):
    result = glmc("run", "--top-k", "1", "--out-seq-length", "40", "--output-path", str(tmp_path / "out"),
                  "Tsinghua University is in [MASK].", "床前明月光")
    assert result.returncode == 0, result.stderr
    assert "Input: Tsinghua University is in [MASK]." in result.stdout
    assert "Input: 床前明月光 [gMASK]" in result.stdout
    assert result.stdout.count("Output: ") == 2
    files = sorted((tmp_path / "out").glob("*.txt"))
    assert len(files) == 2 and all(f.read_text(encoding="utf-8").strip() for f in files)


def test_run_json_beam_search_all_beams():
    result = glmc("run", "--json", "--no-output-files", "--sampling-strategy", "BeamSearchStrategy",
                  "--num-beams", "3", "--out-seq-length", "24", "Hello [MASK] world")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["input"] == "Hello [MASK] world" and len(record["answers"]) == 3
    assert record["scores"] == sorted(record["scores"], reverse=True)
    assert all(a.startswith("Hello") and a.endswith("world") for a in record["answers"])


def test_run_file_with_ids(tmp_path):
    source = tmp_path / "prompts.txt"
    source.write_text("q1\tThe sky is [MASK].\n\nq2\t春眠不觉晓\n", encoding="utf-8")
    result = glmc("run", "--input-source", str(source), "--with-id", "--output-path", str(tmp_path / "out"),
                  "--top-k", "1", "--out-seq-length", "32", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q1.txt", "q2.txt"]


def test_run_interactive_streams_and_stops():
    result = glmc("run", "--no-output-files", "--top-k", "1", "--out-seq-length", "30",
                  stdin="Hello [MASK]\n\nstop\n")
    assert result.returncode == 0, result.stderr
    assert "Please Input Query (stop to exit) >>>" in result.stdout
    assert "Query should not be empty!" in result.stdout
    assert "Output: Hello" in result.stdout


def test_interactive_reports_a_too_long_prompt_and_goes_on():
    result = glmc("run", "--no-output-files", "--top-k", "1", "--out-seq-length", "20",
                  stdin=("word " * 300) + "\nHi\nstop\n")
    assert result.returncode == 0
    assert "glmc: error: prompt 1 is" in result.stderr and "Output: Hi" in result.stdout


@pytest.mark.parametrize("args,fragments", [
    (["run", "--backend", "tensorflow", "x"], ["unknown backend 'tensorflow'"]),
    (["run", "--checkpoint", "/no/such/dir", "x"], ["/no/such/dir: no such checkpoint directory"]),
    (["run", "--no-output-files", "word " * 600], ["prompt 1 is", "at most 512"]),
    (["run", "--no-output-files", "--out-seq-length", "5000", "x"], ["exceeds the model's maximum"]),
    (["run", "--device", "cuda", "x"], ["no CUDA device"]),
    (["run", "--tokenizer", "/no/ice_text.model", "x"], ["never downloads"]),
])
def test_bad_input_gives_one_line(args, fragments):
    assert_one_line_error(glmc(*args), *fragments)


def test_bad_with_id_line(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("no tab here\n")
    assert_one_line_error(glmc("run", "--input-source", str(source), "--with-id", "--no-output-files"),
                          f"{source}:1: --with-id expects 'id<TAB>text'")


def test_usage_errors_exit_2():
    assert_one_line_error(glmc("run", "--input-source", "x.txt", "also a prompt"),
                          "give PROMPTS or --input-source", "glmc run --help", code=2)
    assert_one_line_error(glmc("convert", "a", "b"), "Missing option '--target-tp'", code=2)
    assert_one_line_error(glmc("frobnicate"), "No such command", code=2)


def test_convert_and_inspect(tiny_checkpoint, tmp_path):
    out = tmp_path / "tp4-int8"
    result = glmc("convert", str(tiny_checkpoint), str(out), "--target-tp", "4", "--quantization-bit-width", "8",
                  "--json", "--no-progress")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["target_tp"] == 4 and len(summary["shard_bytes"]) == 4 and summary["peak_rss_bytes"] > 0
    ckpt = SatCheckpoint.open(out)
    assert (ckpt.tp_size, ckpt.info.quantization_bits) == (4, 8)
    info = json.loads(glmc("inspect", str(out), "--json").stdout)
    assert info["tp_size"] == 4 and info["quantization_bits"] == 8 and info["config"]["num_layers"] == 3


def test_convert_truncated_shard_writes_nothing(tiny_checkpoint, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint, src)
    shard = src / "1000/mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    result = glmc("convert", str(src), str(tmp_path / "out"), "--target-tp", "2", "--no-progress")
    assert_one_line_error(result, "mp_rank_00_model_states.pt", "truncated or corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_run_with_a_sat_checkpoint_and_token_ids(tiny_checkpoint):
    result = glmc("run", "--checkpoint", str(tiny_checkpoint), "--json", "--no-output-files", "--top-k", "1",
                  "--out-seq-length", "16", "1 2 3")
    # The test checkpoint has command ids but no tokenizer: text prompts cannot be tokenized.
    assert_one_line_error(result, "has no tokenizer", "--token-ids")
    result = glmc("run", "--checkpoint", str(tiny_checkpoint), "--json", "--no-output-files", "--top-k", "1",
                  "--out-seq-length", "16", "--token-ids", "1 2 [MASK] 3")
    record = json.loads(result.stdout)
    assert record["token_ids"][0][:2] == [1, 2] and record["token_ids"][0][-1] == 3
    assert_one_line_error(glmc("run", "--checkpoint", str(tiny_checkpoint), "--token-ids", "1 two"),
                          "--token-ids: 'two' is neither a token id nor a mask")


def test_output_path_that_is_a_file(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    assert_one_line_error(glmc("run", "--top-k", "1", "--out-seq-length", "20", "--output-path", str(blocker), "Hi"),
                          str(blocker), "--output-path", code=2)


def test_inspect_reports_checkpoint_problems_in_one_line(tiny_checkpoint, tmp_path):
    import shutil

    no_latest = tmp_path / "no-latest"
    shutil.copytree(tiny_checkpoint, no_latest)
    (no_latest / "latest").unlink()
    assert_one_line_error(glmc("inspect", str(no_latest)), f"{no_latest}: no 'latest' file")
    assert_one_line_error(glmc("run", "--checkpoint", str(no_latest), "x"), "no 'latest' file")


def test_run_onnxruntime_exports_the_default_model_once(tmp_path):
    args = ["run", "--backend", "onnxruntime", "--cache-dir", str(tmp_path / "cache"), "--no-output-files",
            "--top-k", "1", "--out-seq-length", "24", "--json", "The sea is [MASK]."]
    first = glmc(*args)
    assert first.returncode == 0, first.stderr
    (package,) = (tmp_path / "cache").iterdir()
    # The first run says what it does and what it cost; the next says nothing of it.
    assert "exporting the embedded model for onnxruntime" in first.stderr and "exported in " in first.stderr
    again = glmc(*args)
    assert "exporting" not in again.stderr
    assert json.loads(again.stdout)["token_ids"] == json.loads(first.stdout)["token_ids"]
    assert list((tmp_path / "cache").iterdir()) == [package]  # reused, not exported again
    torch_run = glmc(*[a for a in args if a not in ("--backend", "onnxruntime")])
    assert json.loads(torch_run.stdout)["token_ids"] == json.loads(first.stdout)["token_ids"]


def test_run_onnxruntime_at_tp2_on_the_default_model(tmp_path):
    """The embedded model's package is exported for the TP degree that runs it (a TP-1
    export in the cache once made `--tp 2` fail)."""
    args = ["run", "--backend", "onnxruntime", "--cache-dir", str(tmp_path / "cache"), "--no-output-files",
            "--top-k", "1", "--out-seq-length", "20", "--json", "The sea is [MASK]."]
    single = glmc(*args)
    assert single.returncode == 0, single.stderr
    double = glmc(*args, "--tp", "2")
    assert double.returncode == 0, double.stderr
    assert json.loads(double.stdout)["token_ids"] == json.loads(single.stdout)["token_ids"]
    assert sorted(p.name.split("-")[3] for p in (tmp_path / "cache").iterdir()) == ["tp1", "tp2"]


def test_an_exported_half_precision_package_runs_on_onnxruntime_on_cpu(tmp_path):
    """`glmc export -o pkg` keeps the embedded model's fp16, which ONNX Runtime runs on CPU."""
    exported = glmc("export", "-o", str(tmp_path / "pkg"))
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "pkg" / "manifest.json").read_text())["dtype"] == "float16"
    ran = glmc("run", "--package", str(tmp_path / "pkg"), "--backend", "onnxruntime", "--no-output-files",
               "--top-k", "1", "--out-seq-length", "16", "--json", "The sea is [MASK].")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["answers"]
