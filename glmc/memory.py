"""Resident memory of this process, for reports and memory tests, and handing freed memory back."""

from __future__ import annotations

import ctypes
import functools
import resource
import sys


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


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    glibc keeps freed blocks below the top of its heap for reuse; after a whole rank of
    mid-sized tensors is freed, fragments of it stay resident and add to the next rank's
    peak. Work that builds rank after rank calls this between ranks."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except AttributeError:  # a C library other than glibc (musl)
        return None
