"""Option values outside what the model and the machine allow: one `glmc: error:` line and a
non-zero exit, never a traceback; and a bug's last resort is one line with a log path."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

RUN = ["run", "--no-output-files", "--out-seq-length", "12"]
CASES = [
    (["--temperature", "nan"], "'nan' is not a finite number"),
    (["--temperature", "inf"], "'inf' is not a finite number"),
    (["--top-p", "nan"], "'nan' is not a finite number"),
    (["--length-penalty", "-inf"], "'-inf' is not a finite number"),
    (["--seed", "1e24"], "'1e24' is not a valid integer"),
    (["--seed", str(2**64)], "--seed"),
    (["--threads", "100000"], "--threads"),
    (["--collective-timeout", "nan"], "'nan' is not a finite number"),
    (["--sampling-strategy", "BeamSearchStrategy", "--num-beams", "5000"], "--num-beams 5000: beam search ranks"),
]


@pytest.mark.parametrize("extra,fragment", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_a_bad_option_value_is_one_line(extra, fragment):
    result = subprocess.run([sys.executable, "-m", "glmc", *RUN, *extra, "Hello [MASK]"],
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("glmc: error:") and fragment in lines[0], result.stderr


@pytest.mark.parametrize("extra", [["--lr", "nan"], ["--embedding-grad-scale", "nan"], ["--seed", "-1"]])
def test_train_refuses_non_finite_numbers(tmp_path, extra):
    result = subprocess.run([sys.executable, "-m", "glmc", "train", "--data", str(tmp_path / "none.txt"),
                             "--steps", "1", "--out", str(tmp_path / "out"), *extra],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("glmc: error: Invalid value for"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_internal_error_is_one_line_with_the_traceback_in_a_log(capsys):
    from glmc.cli import cli, main

    @cli.command("explode-for-test", hidden=True)
    def explode():
        raise ZeroDivisionError("x" * 5000 + "\nsecond line")

    try:
        code = main(["explode-for-test"])
    finally:
        cli.commands.pop("explode-for-test")
    err = capsys.readouterr().err
    assert code == 70 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("glmc: internal error: ZeroDivisionError: xxx") and len(err) < 700
    log = err.rsplit("traceback in ", 1)[1].split(";")[0]
    with open(log) as f:
        assert "Traceback" in f.read()
    assert isinstance(cli, click.Group)


LONG_CALL = """
import sys, torch
from glmc.cli import cli, main

@cli.command("long-call-for-test", hidden=True)
def long_call():
    a = torch.ones(6000, 6000)
    print("started", flush=True)
    for _ in range(50):  # each product a C++ call of seconds: Python cannot raise KeyboardInterrupt inside
        a @ a

sys.exit(main(["long-call-for-test"]))
"""


def test_ctrl_c_ends_glmc_within_a_second_even_inside_a_long_cpp_call():
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-c", LONG_CALL], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert process.stdout.readline().strip() == "started"
        time.sleep(0.5)  # inside a product now
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and stderr.strip() == "glmc: interrupted", stderr
    assert elapsed < 3.0, f"{elapsed:.1f} s after Ctrl-C"
