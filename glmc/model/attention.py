"""Self-attention of one GLM-130B layer on one tensor-parallel rank."""

from __future__ import annotations

import math

import torch
from torch import nn

from glmc.config import GLMConfig, Mapping
from glmc.model.kv_cache import StaticKVCache
from glmc.model.parallel import Collectives, ParallelLinear
from glmc.model.rotary import apply_rotary

# SAT fills masked scores with this before the FP32 softmax (not -inf), so a
# masked score ends at -10000 * (layer_id + 1) after the layer scaling.
MASKED_SCORE = -10000.0


class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig, mapping: Mapping, layer_id: int, dtype: torch.dtype,
                 quantization_bits: int | None = None):
        super().__init__()
        self.num_heads = config.num_attention_heads // mapping.tp_size
        self.head_dim = config.head_dim
        self.layer_id = layer_id
        # Query-key layer scaling: q is divided by (layer_id + 1) and the FP32
        # scores multiplied back, which keeps fp16 scores in range.
        self.scaling_coeff = float(layer_id + 1)
        local_width = self.num_heads * self.head_dim
        # Fused QKV, head-major: each head's q, k, v rows are adjacent.
        self.query_key_value = ParallelLinear(config.hidden_size, 3 * local_width, reduce=False,
                                              dtype=dtype, quantization_bits=quantization_bits)
        self.dense = ParallelLinear(local_width, config.hidden_size, reduce=True, dtype=dtype,
                                    quantization_bits=quantization_bits)

    def forward(
        self,
        x: torch.Tensor,  # [b, s, h]
        cos: torch.Tensor,  # [b, 1, s, hd] at the position ids
        sin: torch.Tensor,
        mask: torch.Tensor,  # [b|1, 1, s, past + s] bool, True = masked
        past: tuple[torch.Tensor, torch.Tensor] | StaticKVCache | None,  # k, v [b, heads, past, hd], or buffers
        comm: Collectives,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, s, _ = x.shape
        qkv = self.query_key_value(x, comm).view(b, s, self.num_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # each [b, heads, s, hd]
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if isinstance(past, StaticKVCache):
            k, v = past.write(self.layer_id, k, v)  # views [b, heads, past + s, hd] of the buffers
        elif past is not None:
            k = torch.cat((past[0], k), dim=2)  # [b, heads, past + s, hd]
            v = torch.cat((past[1], v), dim=2)

        q = q / (math.sqrt(self.head_dim) * self.scaling_coeff)
        scores = torch.matmul(q, k.transpose(-1, -2))  # [b, heads, s, past + s], model dtype
        scores = scores.masked_fill(mask, MASKED_SCORE)
        # Softmax in FP32, then back to the model dtype before multiplying by V.
        probs = torch.softmax(scores.float() * self.scaling_coeff, dim=-1).to(v.dtype)
        context = torch.matmul(probs, v)  # [b, heads, s, hd]
        context = context.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.dense(context, comm), (k, v)
