"""Tensor-parallel building blocks: which way each weight is split, and the collectives.

A rank holds whole heads of `query_key_value`, its slice of the GeGLU halves of
`dense_h_to_4h`, the matching input columns of the row-parallel `dense` and
`dense_4h_to_h` (whose outputs are partial sums: all-reduce, then add the
replicated bias once), and a contiguous block of vocabulary rows.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from glmc.config import Mapping
from glmc.errors import GlmcError
from glmc.model.quantized import weight_only_matmul
from glmc.quantization import dequantize


class Collectives(Protocol):
    """What a rank needs from its peers."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor: ...


class SingleRank:
    """TP 1: nothing to exchange."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TorchDistributed:
    """Collectives over a torch.distributed process group (gloo on CPU, NCCL on GPU).

    Every tensor handed to a collective must be on the rank's `device`: NCCL takes only
    tensors of its GPU and gloo only host tensors, and a tensor on the wrong device means
    a host round trip (or a crash) that a CPU run would never show. The check makes a
    CPU run catch what would break on GPUs.
    `seconds` and `calls` count the time spent in them, for the benchmarks.
    """

    def __init__(self, mapping: Mapping, group=None, device: str | torch.device = "cpu"):
        self.mapping = mapping
        self.group = group
        self.device = torch.device(device)
        self.seconds = 0.0
        self.calls = 0

    def check(self, x: torch.Tensor, collective: str) -> None:
        if x.device != self.device:
            raise GlmcError(f"rank {self.mapping.rank}: a tensor on {x.device} reached the {collective} of "
                            f"a group on {self.device}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x, "all-reduce")
        start = time.perf_counter()
        x = x.contiguous()
        torch.distributed.all_reduce(x, group=self.group)
        self._count(start)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x, "all-gather")
        start = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.mapping.tp_size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=self.group)
        self._count(start)
        return torch.cat(parts, dim=-1)

    def _count(self, start: float) -> None:
        self.seconds += time.perf_counter() - start
        self.calls += 1


class ParallelLinear(nn.Module):
    """`y = x W^T (+ b)` over one rank's slice of W.

    Column-parallel (`reduce=False`): W holds this rank's output rows, bias added
    locally (SAT's ColumnParallelLinear). Row-parallel (`reduce=True`): W holds this
    rank's input columns, the partial products are all-reduced and the full bias is
    added once afterwards (SAT's RowParallelLinear).

    Quantized (`quantization_bits` 8 or 4), W is GLM-130B's int8 codes (two int4 per
    byte) with one fp16 scale per output row (`weight_scale`), multiplied without
    ever dequantizing the whole weight (`glmc.model.quantized`).
    """

    def __init__(self, in_features: int, out_features: int, *, reduce: bool, dtype: torch.dtype,
                 quantization_bits: int | None = None):
        super().__init__()
        self.reduce = reduce
        self.dtype = dtype
        self.quantization_bits = quantization_bits
        if quantization_bits is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        else:
            self.weight = nn.Parameter(
                torch.empty(out_features, in_features * quantization_bits // 8, dtype=torch.int8),
                requires_grad=False)
            self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float16),
                                             requires_grad=False)
        self._kernel_cache: dict = {}  # the packed int4 kernel's layout of the codes, made on first use
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype))

    def dense_weight(self) -> torch.Tensor:
        """W in the compute dtype (dequantized with GLM's numerics when quantized)."""
        if self.quantization_bits is None:
            return self.weight
        return dequantize(self.weight, self.weight_scale, self.quantization_bits).to(self.dtype)

    def forward(self, x: torch.Tensor, comm: Collectives) -> torch.Tensor:
        if self.quantization_bits is not None:
            partial = weight_only_matmul(x, self.weight, self.weight_scale, self.quantization_bits,
                                         self._kernel_cache)
            return (comm.all_reduce(partial) if self.reduce else partial) + self.bias
        if not self.reduce:
            return F.linear(x, self.dense_weight(), self.bias)
        partial = F.linear(x, self.dense_weight())
        return comm.all_reduce(partial) + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding over this rank's block of vocabulary rows; other rows read as zero."""

    def __init__(self, vocab_size: int, hidden_size: int, mapping: Mapping, dtype: torch.dtype):
        super().__init__()
        rows = vocab_size // mapping.tp_size
        self.start = mapping.rank * rows
        self.end = self.start + rows
        self.tp_size = mapping.tp_size
        self.weight = nn.Parameter(torch.empty(rows, hidden_size, dtype=dtype))

    def forward(self, tokens: torch.Tensor, comm: Collectives) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.start) | (tokens >= self.end)
        local = torch.where(outside, torch.zeros_like(tokens), tokens - self.start)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return comm.all_reduce(out)
