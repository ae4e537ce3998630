"""The wheel installs backends/, graphs/ and passes/ as glmc.backends, glmc.graphs, glmc.passes."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), "-q"], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("glmc-*.whl")
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
