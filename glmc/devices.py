"""Device names: what `--device` may say, and whether this machine has it.

Checked before anything starts (an export, a worker process): a missing GPU is a
one-line error, not a failure halfway through loading.
"""

from __future__ import annotations

import re

from glmc.errors import GlmcError

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_device(device: str) -> tuple[str, int | None]:
    """("cpu" | "cuda", index or None) of a device name; a GlmcError for anything else."""
    match = _DEVICE.match(device or "")
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise GlmcError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def check_device(device: str, tp_size: int = 1) -> None:
    """Refuse a device this machine lacks, and a CUDA run with more ranks than GPUs."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise GlmcError(f"--device {device}: no CUDA device is available to PyTorch on this machine "
                        f"(PyTorch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise GlmcError(f"--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    if tp_size > 1 and index is not None:
        raise GlmcError(f"--device {device} names one GPU; --tp {tp_size} puts rank r on cuda:r: pass --device cuda")
    if tp_size > count:
        raise GlmcError(f"--tp {tp_size} needs {tp_size} GPUs, this machine has {count}")


def rank_device(device: str, local_rank: int) -> str:
    """The device of a rank: rank r of a CUDA run uses the GPU of its local rank on its machine."""
    kind, index = parse_device(device)
    if kind == "cuda" and index is None:
        return f"cuda:{local_rank}"
    return device
