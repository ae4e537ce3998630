"""Deep checks of a checkpoint's bytes (`glmc inspect --verify`): every zip record against its
CRC-32, every floating-point weight for NaN and infinity. Both stream: records are read in
blocks, tensors are scanned in chunks of their memory-mapped pages, which are released after
each chunk, so a 32 GB shard is checked in a few tens of MB of memory."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import struct
import sys
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from glmc.errors import CheckpointError
from glmc.checkpoint.sat import SAT_PREFIX, check_stored, quoted, read_state

BLOCK_BYTES = 4 << 20  # read, or scanned, at a time (a scan's temporaries are a few times that)
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip local file header (30 bytes)
_LOCAL_SIGNATURE = 0x04034B50


@dataclass(frozen=True)
class NonFinite:
    name: str  # SAT's key, "transformer.layers.0...."
    count: int  # NaN and infinite values in it


@dataclass
class ShardVerification:
    file: str
    records: int | None  # zip records whose CRC-32 matched (None: a legacy, non-zip shard)
    records_without_crc: int  # records written with CRC-32 off (torch.serialization.set_crc32_options)
    tensors: int  # floating-point tensors scanned
    non_finite: list[NonFinite] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def verify_shard(path: Path) -> ShardVerification:
    """Check one shard's records, then scan its weights; a corrupt record raises CheckpointError."""
    check_stored(path)
    records, without_crc = check_crcs(path)
    state, mapped = read_state(path)
    result = ShardVerification(str(path), records, without_crc, 0)
    for name, tensor in state.items():
        if tensor.is_floating_point():
            result.tensors += 1
            count = count_non_finite(tensor, release=mapped)
            if count:
                result.non_finite.append(NonFinite(SAT_PREFIX + name, count))
    return result


def check_crcs(path: Path) -> tuple[int | None, int]:
    """(records checked, records without a CRC); (None, 0) for a legacy (non-zip) shard."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None, 0
    checked = without = 0
    with archive, open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for info in archive.infolist():
            name = quoted(info.filename)
            f.seek(info.header_offset)
            header = f.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != _LOCAL_SIGNATURE:
                raise CheckpointError(f"{path}: zip record {name} has no local header at offset "
                                      f"{info.header_offset:,} (a corrupt or truncated file)")
            *_, name_length, extra_length = _LOCAL_HEADER.unpack(header)
            start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            if start + info.file_size > size:
                raise CheckpointError(f"{path}: zip record {name} runs past the end of the file (truncated)")
            f.seek(start)
            crc, left = 0, info.file_size
            while left:
                block = f.read(min(BLOCK_BYTES, left))
                if not block:
                    raise CheckpointError(f"{path}: zip record {name} runs past the end of the file (truncated)")
                crc, left = zlib.crc32(block, crc), left - len(block)
            if info.CRC == 0 and info.file_size:
                without += 1  # torch.save with CRC-32 turned off writes 0: nothing to compare
            elif crc != info.CRC:
                raise CheckpointError(f"{path}: zip record {name} is corrupt: its CRC-32 is {crc:08x}, the "
                                      f"zip directory records {info.CRC:08x}")
            else:
                checked += 1
    return checked, without


def count_non_finite(tensor: torch.Tensor, release: bool = False) -> int:
    """NaN and infinite values in `tensor`, a chunk at a time (the temporaries stay small); with
    `release`, the memory-mapped pages of each chunk are handed back once scanned."""
    if tensor.dim() == 0:
        return int(not torch.isfinite(tensor))
    if tensor.is_contiguous():
        flat = tensor.reshape(-1)  # a view: contiguous
        step = max(1, BLOCK_BYTES // tensor.element_size())
        parts = (flat[i:i + step] for i in range(0, flat.numel(), step))
    else:
        rows = max(1, BLOCK_BYTES // max(1, tensor[0].numel() * tensor.element_size()))
        parts = (tensor[i:i + rows] for i in range(0, tensor.shape[0], rows))
    total = 0
    for part in parts:
        total += part.numel() - int(torch.isfinite(part).sum())
        if release and part.is_contiguous():
            _release_pages(part)
    return total


def _release_pages(part: torch.Tensor) -> None:
    """Drop the whole pages under `part` from this process (MADV_DONTNEED).

    Only for tensors memory-mapped from a file and never written: their pages are the file's, and
    touching them again reads them back. Pages shared with a neighbouring chunk are kept."""
    if not sys.platform.startswith("linux"):
        return
    start = part.data_ptr()
    end = start + part.numel() * part.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4: MADV_DONTNEED


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
