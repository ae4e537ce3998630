"""An independent GLM-130B forward pass in NumPy, written from the facts page only.

It shares no code with glmc.model: NumPy instead of torch, float64 instead of the
model dtype (except where GLM-130B's numerics are defined by a narrower type: the
fp16 rotary table), SAT's [seq, batch] order and fused-QKV view as the facts page
states them. Tests compare glmc against it.
"""

from __future__ import annotations

import math

import numpy as np


def _erf(x: np.ndarray) -> np.ndarray:
    # math.erf is exact to double precision; vectorise it.
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def rotary_table(max_positions: int, head_dim: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """SAT's table: inv_freq rounded to fp16, positions and products in fp16, cos/sin of
    those angles as CUDA computes them for half tensors (in float32), rounded to fp16."""
    inv_freq = (1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float16)
    t = np.arange(max_positions, dtype=np.float16)
    freqs = (t[:, None] * inv_freq[None, :]).astype(np.float16)  # one fp16 rounding per product
    emb = np.concatenate([freqs, freqs], axis=-1)
    # Correctly rounded float32 cos/sin (from float64), then one rounding to fp16.
    cos = np.cos(emb.astype(np.float64)).astype(np.float32).astype(np.float16)
    sin = np.sin(emb.astype(np.float64)).astype(np.float32).astype(np.float16)
    return cos, sin


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def forward(weights: dict[str, np.ndarray], config: dict, tokens: np.ndarray, position_ids: np.ndarray,
            mask: np.ndarray) -> dict[str, np.ndarray]:
    """tokens, position_ids [b, s]; mask [b|1, 1, s, s] bool, True = masked.

    Returns logits [b, s, V], hidden_states [L, b, s, h] and mem_kv [L, b, s, 2h] (SAT's cache layout).
    """
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    num_layers, hidden, heads = config["num_layers"], config["hidden_size"], config["num_attention_heads"]
    eps = config.get("layernorm_epsilon", 1e-5)
    hn = hidden // heads
    alpha = math.sqrt(2 * num_layers)
    cos_t, sin_t = rotary_table(int(position_ids.max()) + 1, hn)

    x = w["word_embeddings.weight"][tokens].transpose(1, 0, 2)  # [s, b, h]
    s, b, _ = x.shape
    pos = position_ids.T  # [s, b]
    cos = cos_t.astype(np.float64)[pos][:, :, None, :]  # [s, b, 1, hn]
    sin = sin_t.astype(np.float64)[pos][:, :, None, :]

    def rotate_half(t):
        return np.concatenate([-t[..., hn // 2:], t[..., : hn // 2]], axis=-1)

    hidden_states, mems = [], []
    for layer in range(num_layers):
        p = lambda name: w[f"layers.{layer}.{name}"]  # noqa: E731
        a_in = layer_norm(x, p("input_layernorm.weight"), p("input_layernorm.bias"), eps)
        qkv = a_in @ p("attention.query_key_value.weight").T + p("attention.query_key_value.bias")
        qkv = qkv.reshape(s, b, heads, 3 * hn)  # head-major: each head's q, k, v adjacent
        q, k, v = qkv[..., :hn], qkv[..., hn:2 * hn], qkv[..., 2 * hn:]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        mems.append(np.concatenate([k.transpose(1, 0, 2, 3).reshape(b, s, hidden),
                                    v.transpose(1, 0, 2, 3).reshape(b, s, hidden)], axis=-1))
        c = layer + 1
        q = q / (math.sqrt(hn) * c)
        scores = np.einsum("qbnd,kbnd->bnqk", q, k)
        scores = np.where(mask, -10000.0, scores) * c
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(-1, keepdims=True)
        ctx = np.einsum("bnqk,kbnd->qbnd", probs, v).reshape(s, b, hidden)
        attn = ctx @ p("attention.dense.weight").T + p("attention.dense.bias")
        h = a_in * alpha + attn
        m_in = layer_norm(h, p("post_attention_layernorm.weight"), p("post_attention_layernorm.bias"), eps)
        y = m_in @ p("mlp.dense_h_to_4h.weight").T + p("mlp.dense_h_to_4h.bias")
        y1, y2 = y[..., : y.shape[-1] // 2], y[..., y.shape[-1] // 2:]
        y = (y1 * gelu(y2)) @ p("mlp.dense_4h_to_h.weight").T + p("mlp.dense_4h_to_h.bias")
        x = m_in * alpha + y
        hidden_states.append(x.transpose(1, 0, 2))
    x = layer_norm(x, w["final_layernorm.weight"], w["final_layernorm.bias"], eps)
    logits = (x @ w["word_embeddings.weight"].T).transpose(1, 0, 2)
    return {"logits": logits, "hidden_states": np.stack(hidden_states), "mem_kv": np.stack(mems)}


def glm_mask(total: int, context_length: int) -> np.ndarray:
    """generate.py: causal, plus columns < context_length - 1 visible to every row. [1, 1, s, s], True = masked."""
    visible = np.tril(np.ones((total, total), dtype=bool))
    visible[:, : context_length - 1] = True
    return ~visible[None, None]
