"""The wheel installs backends/, graphs/ and passes/ as glmc.backends, glmc.graphs, glmc.passes."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(folder), "-q"], check=True, capture_output=True, timeout=600)
    (built,) = folder.glob("glmc-*.whl")
    return built


@pytest.mark.slow
def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("backends", "graphs", "passes"):
        assert f"glmc/{package}/__init__.py" in names
        assert not any(n.startswith(f"{package}/") for n in names), f"top-level {package}/ in the wheel"
    assert "glmc/backends/pytorch.py" in names
    # Every package of the source tree is in the wheel (glmc.evaluation once was not).
    for init in sorted((REPO / "glmc").glob("*/__init__.py")):
        assert f"glmc/{init.parent.name}/__init__.py" in names, f"glmc.{init.parent.name} is not packaged"
    assert "glmc/embedded/default/ice_text.model" in names
    assert any(n.startswith("glmc/embedded/default/") and n.endswith("_model_states.pt") for n in names)
    top_level = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["glmc"]


def test_editable_install_resolves_the_mapping():
    import glmc.backends
    import glmc.passes

    assert Path(glmc.backends.__file__).resolve() == REPO / "backends" / "__init__.py"
    assert Path(glmc.passes.__file__).resolve() == REPO / "passes" / "__init__.py"


@pytest.mark.slow
def test_the_installed_wheel_runs_every_command(wheel, tmp_path):
    # A fresh venv holding the wheel (not this editable checkout); its dependencies come from this
    # environment's site-packages, added as a plain path (so this checkout's editable finder,
    # installed by a .pth file there, is not).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    with zipfile.ZipFile(wheel) as archive:  # what pip would install, without needing pip in the venv
        archive.extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, HOME=str(tmp_path / "home"), NO_COLOR="1")
    env.pop("PYTHONPATH", None)

    def glmc(*args: str) -> str:
        result = subprocess.run([str(python), "-m", "glmc", *args], cwd=work, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, (args, result.stderr[-2000:])
        return result.stdout

    where = subprocess.run([str(python), "-c", "import glmc, glmc.evaluation; print(glmc.__file__)"], env=env,
                           cwd=work, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    assert "evaluate" in glmc("--help")
    assert "Output:" in glmc("run", "--no-output-files", "--out-seq-length", "24", "Hello [MASK]")
    glmc("export", "-o", "pkg", "--no-progress")
    assert "valid glmc package" in glmc("inspect", "pkg")
    assert "Output:" in glmc("run", "--package", "pkg", "--backend", "onnxruntime", "--no-output-files",
                             "--out-seq-length", "24", "Hello [MASK]")
    embedded = site / "glmc" / "embedded" / "default"
    glmc("convert", str(embedded), "tp2", "--target-tp", "2")
    assert "valid SAT checkpoint" in glmc("inspect", "tp2")
    assert "Finish task" in glmc("evaluate", str(REPO / "tasks" / "demo" / "fortune-choice.yaml"),
                                 "--data-path", str(REPO / "tasks" / "demo" / "data"), "--output", "results.json")
    glmc("train", "--config", "glm-demo", "--data", str(REPO / "data" / "corpus" / "en.txt"), "--steps", "2",
         "--batch-size", "2", "--seq-len", "32", "--out", "trained", "--no-progress")
    assert (work / "trained" / "latest").is_file()
