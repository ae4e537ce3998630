"""Traced per-rank graphs and the compiled package format.

Reading a package needs onnx but not the exporter: `glmc.graphs.trace` (torch.onnx,
onnxscript) is imported only by what traces.
"""

from glmc.graphs.package import Package, PackageError, write_package
from glmc.graphs.seal import GRAPHS


def __getattr__(name: str):
    if name in ("ExportError", "export_graph"):
        from glmc.graphs import trace

        return getattr(trace, name)
    raise AttributeError(f"module 'glmc.graphs' has no attribute {name!r}")


__all__ = ["GRAPHS", "ExportError", "Package", "PackageError", "export_graph", "write_package"]
