"""Resident memory of this process, for reports and memory tests."""

from __future__ import annotations

import resource


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory.

    VmHWM belongs to this process's own address space; `ru_maxrss` would also
    carry a parent's peak across fork and exec.
    """
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024
