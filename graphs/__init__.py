"""Traced per-rank graphs and the compiled package format."""

from glmc.graphs.package import Package, PackageError, write_package
from glmc.graphs.trace import GRAPHS, ExportError, export_graph

__all__ = ["GRAPHS", "ExportError", "Package", "PackageError", "export_graph", "write_package"]
