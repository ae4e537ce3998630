"""Model sources: a SAT checkpoint or a compiled package, opened from a folder."""

from __future__ import annotations

import os
from pathlib import Path

from glmc.config import GLMConfig, from_name

EMBEDDED_DEFAULT = Path(__file__).parent / "embedded" / "default"
MANIFEST = "manifest.json"  # what makes a folder a compiled package (glmc.graphs.seal reads it)


def is_package(root: Path) -> bool:
    """A package, whole or damaged (opening it says which). Decided without importing the
    package reader, which needs onnx: a torch run on a checkpoint never loads it."""
    return (root / MANIFEST).is_file() or (root / "rank0").is_dir()


def is_checkpoint_source(source) -> bool:
    from glmc.checkpoint import SatCheckpoint

    return isinstance(source, SatCheckpoint)


def open_source(path: str | os.PathLike | None, config: str | GLMConfig | None = None):
    """A compiled package (a folder with manifest.json) or a SAT checkpoint; None: the embedded model."""
    root = Path(path) if path is not None else EMBEDDED_DEFAULT
    if is_package(root):
        from glmc.graphs import Package

        return Package.open(root)
    from glmc.checkpoint import SatCheckpoint

    return SatCheckpoint.open(root, from_name(config) if isinstance(config, str) else config)
