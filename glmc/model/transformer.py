"""The GLM-130B reference model: one tensor-parallel rank of it, in PyTorch.

Numerics follow SwissArmyTransformer 0.2.12's `GLM130B` step by step (DeepNorm
post-LN, fused head-major QKV, SAT's fp16 rotary table, query-key layer scaling
with an FP32 softmax, exact-GELU GeGLU, tied output projection). Tensors are
batch-first here; SAT runs [seq, batch, hidden], which changes no arithmetic.
Parameter names equal SAT's state-dict keys without the `transformer.` prefix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from glmc.config import GLMConfig, Mapping
from glmc.errors import GlmcError
from glmc.model.attention import SelfAttention
from glmc.model.kv_cache import StaticKVCache
from glmc.model.mlp import GeGLU
from glmc.model.parallel import Collectives, SingleRank, VocabParallelEmbedding
from glmc.model.rotary import sat_rotary_table

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [b, heads, seq, hd]


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [b, s, vocab] (or [b, r, vocab] at `logit_positions`, [b, 1, vocab] with last_logits_only)
    kv_cache: KVCache | StaticKVCache  # past + this call's keys (after rotary) and values
    hidden_states: tuple[torch.Tensor, ...] | None  # each layer's output [b, s, h]


class GLMLayer(nn.Module):
    def __init__(self, config: GLMConfig, mapping: Mapping, layer_id: int, dtype: torch.dtype,
                 quantization_bits: int | None):
        super().__init__()
        self.alpha = config.deepnorm_alpha
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(h, eps=eps, dtype=dtype)
        self.attention = SelfAttention(config, mapping, layer_id, dtype, quantization_bits)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps, dtype=dtype)
        self.mlp = GeGLU(config, mapping, dtype, quantization_bits)

    def forward(self, x, cos, sin, mask, past, comm):
        # DeepNorm, post-LN: the residual is the normalised input scaled by alpha.
        attention_input = self.input_layernorm(x)
        attention_output, kv = self.attention(attention_input, cos, sin, mask, past, comm)
        x = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(x)
        return mlp_input * self.alpha + self.mlp(mlp_input, comm), kv


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` (GLM-130B's embedding shrink)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class GLMModel(nn.Module):
    def __init__(
        self,
        config: GLMConfig,
        mapping: Mapping = Mapping(),
        *,
        dtype: torch.dtype = torch.float32,
        quantization_bits: int | None = None,
        comm: Collectives | None = None,
        embedding_grad_scale: float = 1.0,
    ):
        super().__init__()
        config.check_mapping(mapping)
        self.config, self.mapping, self.dtype = config, mapping, dtype
        self.quantization_bits = quantization_bits
        self.comm = comm if comm is not None else (SingleRank() if mapping.tp_size == 1 else None)
        # GLM-130B trains with the embedding gradient multiplied by 0.1.
        self.embedding_grad_scale = embedding_grad_scale
        self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, mapping, dtype)
        self.layers = nn.ModuleList(
            GLMLayer(config, mapping, i, dtype, quantization_bits) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, dtype=dtype)
        cos, sin = sat_rotary_table(config.max_sequence_length, config.head_dim, config.rotary_base, dtype)
        self.register_buffer("rotary_cos", cos, persistent=False)  # [max_seq, hd]
        self.register_buffer("rotary_sin", sin, persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,  # [b, s] int64
        position_ids: torch.Tensor,  # [b, s] int64
        attention_mask: torch.Tensor,  # [b|1, 1, s, past + s] bool, True = masked
        kv_cache: KVCache | StaticKVCache | None = None,
        *,
        output_hidden_states: bool = False,
        last_logits_only: bool = False,
        logit_positions: torch.Tensor | None = None,  # [r] int64: the positions whose logits to compute
    ) -> ModelOutput:
        """A static cache is extended in place (and returned); a list of (k, v) is not touched:
        the returned one holds past and new keys and values."""
        comm = self.comm
        if comm is None:
            raise GlmcError(f"rank {self.mapping.rank} of a TP-{self.mapping.tp_size} model needs "
                            "collectives (pass comm=TorchDistributed(...))")
        x = self.word_embeddings(tokens, comm)  # [b, s, h]
        if self.embedding_grad_scale != 1.0 and torch.is_grad_enabled():
            x = _ScaleGradient.apply(x, self.embedding_grad_scale)
        cos = F.embedding(position_ids, self.rotary_cos).unsqueeze(1)  # [b, 1, s, hd]
        sin = F.embedding(position_ids, self.rotary_sin).unsqueeze(1)
        static = isinstance(kv_cache, StaticKVCache)
        if static:
            kv_cache.reserve(kv_cache.length + tokens.shape[1])
        new_cache: KVCache = []
        hidden_states = []
        for i, layer in enumerate(self.layers):
            past = kv_cache if static else kv_cache[i] if kv_cache is not None else None
            x, kv = layer(x, cos, sin, attention_mask, past, comm)
            new_cache.append(kv)
            if output_hidden_states:
                hidden_states.append(x)
        if static:
            kv_cache.advance(tokens.shape[1])
        if logit_positions is not None:
            x = x.index_select(1, logit_positions)
        elif last_logits_only:
            x = x[:, -1:]
        x = self.final_layernorm(x)
        logits = comm.all_gather_last(F.linear(x, self.word_embeddings.weight))
        return ModelOutput(logits, kv_cache if static else new_cache,
                           tuple(hidden_states) if output_hidden_states else None)
