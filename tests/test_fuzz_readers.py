"""Random bytes and random JSON/YAML fed to every reader of user files: the config
(model_config.json), the package manifest, prompt text and task YAML. The only outcomes
allowed are success or one `glmc: error:` line, in bounded time and output: never a
traceback, a hang or unbounded output.

Each example runs the real CLI (`glmc inspect`, `glmc evaluate`, `glmc run`) in this
process, on real files: `main()` returns the exit status and prints what a user sees.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmc.cli import main

MAX_OUTPUT = 2000  # characters of stderr any refusal may print
FUZZ = settings(max_examples=60, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow], derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, err: str) -> None:
    """Success, or exactly one `glmc: error:` line (never an internal error), of bounded size."""
    assert "Traceback" not in err and len(err) <= MAX_OUTPUT, err[:3000]
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("glmc: error: "), err[:3000]


def mutate(document, path: list, value):
    """A copy of `document` with the value at `path` (keys and indices, followed as far as they go)
    replaced by `value`."""
    document = json.loads(json.dumps(document))
    node, parent, key = document, None, None
    for step in path:
        if isinstance(node, dict) and node:
            key = sorted(node)[step % len(node)]
        elif isinstance(node, list) and node:
            key = step % len(node)
        else:
            break
        parent, node = node, node[key]
    if parent is None:
        return value
    parent[key] = value
    return document


@pytest.fixture(scope="module")
def checkpoint_copy(tiny_checkpoint, tmp_path_factory):
    return Path(shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("fuzz") / "ckpt"))


@pytest.fixture(scope="module")
def package_copy(tiny_package, tmp_path_factory):
    return Path(shutil.copytree(tiny_package, tmp_path_factory.mktemp("fuzz") / "pkg"))


# --- model_config.json ------------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_as_model_config(checkpoint_copy, data):
    original = (checkpoint_copy / "model_config.json").read_bytes()
    try:
        (checkpoint_copy / "model_config.json").write_bytes(data)
        assert_clean(*run_cli("inspect", str(checkpoint_copy))[::2])
    finally:
        (checkpoint_copy / "model_config.json").write_bytes(original)


@FUZZ
@given(path=st.lists(st.integers(0, 40), max_size=3), value=json_values)
def test_random_values_in_model_config(checkpoint_copy, path, value):
    original = (checkpoint_copy / "model_config.json").read_bytes()
    try:
        document = mutate(json.loads(original), path, value)
        (checkpoint_copy / "model_config.json").write_text(json.dumps(document))
        assert_clean(*run_cli("inspect", str(checkpoint_copy))[::2])
    finally:
        (checkpoint_copy / "model_config.json").write_bytes(original)


# --- the package manifest ---------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_as_manifest(package_copy, data):
    original = (package_copy / "manifest.json").read_bytes()
    try:
        (package_copy / "manifest.json").write_bytes(data)
        code, _, err = run_cli("inspect", str(package_copy))
        assert code != 0
        assert_clean(code, err)
    finally:
        (package_copy / "manifest.json").write_bytes(original)


@FUZZ
@given(path=st.lists(st.integers(0, 400), min_size=1, max_size=5), value=json_values)
def test_random_values_in_manifest(package_copy, path, value):
    original = (package_copy / "manifest.json").read_bytes()
    try:
        document = mutate(json.loads(original), path, value)
        (package_copy / "manifest.json").write_text(json.dumps(document))
        assert_clean(*run_cli("inspect", str(package_copy))[::2])
    finally:
        (package_copy / "manifest.json").write_bytes(original)


# --- task YAML --------------------------------------------------------------------------------

yaml_texts = st.one_of(
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", errors="surrogateescape")),
    st.lists(st.sampled_from(list("abc:-[]{}&*!|>'\"#\n  ,0123.") + ["name", "type", "path", "mul", "&a", "*a"]),
             max_size=120).map("".join),
    json_values.map(json.dumps),
)


@FUZZ
@given(text=yaml_texts)
def test_random_task_yaml(tmp_path_factory, text):
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    (folder / "task.yaml").write_bytes(text.encode("utf-8", errors="surrogateescape"))
    (folder / "data").mkdir()
    assert_clean(*run_cli("evaluate", str(folder / "task.yaml"), "--data-path", str(folder / "data"),
                          "--output", str(folder / "out.json"))[::2])


# --- prompt text ------------------------------------------------------------------------------

@settings(max_examples=25, deadline=30_000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("utf-8", "surrogateescape")))
def test_random_prompts(prompt):
    code, _, err = run_cli("run", "--no-output-files", "--out-seq-length", "64", "--top-k", "1", "--", prompt)
    assert_clean(code, err)
