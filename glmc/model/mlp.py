"""GeGLU feed-forward of one GLM-130B layer on one tensor-parallel rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmc.config import GLMConfig, Mapping
from glmc.model.parallel import Collectives, ParallelLinear


class GeGLU(nn.Module):
    def __init__(self, config: GLMConfig, mapping: Mapping, dtype: torch.dtype,
                 quantization_bits: int | None = None):
        super().__init__()
        local_inner = config.inner_hidden_size // mapping.tp_size
        # Rows are [this rank's x1 slice; this rank's x2 slice] (GLU layout).
        self.dense_h_to_4h = ParallelLinear(config.hidden_size, 2 * local_inner, reduce=False,
                                            dtype=dtype, quantization_bits=quantization_bits)
        self.dense_4h_to_h = ParallelLinear(local_inner, config.hidden_size, reduce=True,
                                            dtype=dtype, quantization_bits=quantization_bits)

    def forward(self, x: torch.Tensor, comm: Collectives) -> torch.Tensor:  # [b, s, h]
        x1, x2 = self.dense_h_to_4h(x, comm).chunk(2, dim=-1)  # each [b, s, inner / tp]
        return self.dense_4h_to_h(x1 * F.gelu(x2), comm)  # exact (erf) GELU
