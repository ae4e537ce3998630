"""The reference model against SAT's golden numbers and an independent NumPy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oracle
from conftest import sat_tiny_npz, sat_tiny_weights
from glmc.config import GLMConfig
from glmc.model import GLMModel
from glmc.model.init import init_wide_random_
from glmc.model.rotary import sat_rotary_table
from tolerances import assert_close

SAT_TINY_CONFIG = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=8, inner_hidden_size=128,
                            vocab_size=1024, max_sequence_length=128)


def sat_mem_layout(kv_cache) -> np.ndarray:
    """Our per-layer (k, v) [b, heads, s, hd] as SAT's mems [layers, b, s, 2h]: K heads then V heads."""
    layers = []
    for k, v in kv_cache:
        b, heads, s, hd = k.shape
        layers.append(torch.cat([k.permute(0, 2, 1, 3).reshape(b, s, heads * hd),
                                 v.permute(0, 2, 1, 3).reshape(b, s, heads * hd)], dim=-1))
    return torch.stack(layers).numpy()


def weights_of(model: GLMModel) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items() if not k.startswith("rotary")}


@pytest.fixture(scope="module")
def sat_tiny_model():
    model = GLMModel(SAT_TINY_CONFIG)
    model.load_state_dict(sat_tiny_weights())
    return model.eval()


def test_forward_matches_sat_golden(sat_tiny_model):
    case = sat_tiny_npz("fwd_gmask")
    with torch.no_grad():
        out = sat_tiny_model(torch.from_numpy(case["tokens"]), torch.from_numpy(case["position_ids"]),
                             torch.from_numpy(case["attention_mask"]), output_hidden_states=True)
    assert_close(out.logits, case["logits"], "float32", "logits vs SAT")
    assert_close(torch.stack(out.hidden_states), case["hidden_states"], "float32", "hidden states vs SAT")
    assert_close(sat_mem_layout(out.kv_cache), case["mem_kv"], "float32", "KV cache vs SAT mems")


def test_oracle_itself_matches_sat_golden():
    """The NumPy oracle is only a reference if it reproduces the original code too."""
    case = sat_tiny_npz("fwd_gmask")
    ref = oracle.forward({k: v.numpy() for k, v in sat_tiny_weights().items()}, SAT_TINY_CONFIG.__dict__,
                         case["tokens"], case["position_ids"], case["attention_mask"])
    assert_close(ref["logits"], case["logits"], "float32", "oracle logits vs SAT")
    assert_close(ref["mem_kv"], case["mem_kv"], "float32", "oracle mems vs SAT")


def _prompt(kind: str, length: int, context: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens = rng.integers(0, 1000, (1, length))
    positions = np.arange(length)[None]
    if kind == "causal":
        mask = ~np.tril(np.ones((length, length), dtype=bool))[None, None]
    else:
        mask = oracle.glm_mask(length, context)
        if kind == "mask":  # [MASK]: sop and everything after it sit at the mask's position
            positions = positions.copy()
            positions[0, context - 1:] = 5
    return tokens, positions, mask


@pytest.mark.parametrize("kind", ["gmask", "mask", "causal"])
def test_logits_match_independent_computation(tiny_model, kind):
    rng = np.random.default_rng(["gmask", "mask", "causal"].index(kind))
    tokens, positions, mask = _prompt(kind, 24, 15, rng)
    ref = oracle.forward(weights_of(tiny_model), tiny_model.config.__dict__, tokens, positions, mask)
    with torch.no_grad():
        out = tiny_model(torch.from_numpy(tokens), torch.from_numpy(positions), torch.from_numpy(mask),
                         output_hidden_states=True)
    assert_close(out.logits, ref["logits"], "float32", f"{kind} logits")
    assert_close(sat_mem_layout(out.kv_cache), ref["mem_kv"], "float32", f"{kind} KV cache")


@pytest.mark.parametrize("kind", ["gmask", "mask", "causal"])
def test_each_layer_matches_independent_computation(tiny_model, kind):
    """Layer by layer from the oracle's own inputs, so fp32 rounding is not amplified across layers."""
    rng = np.random.default_rng(["gmask", "mask", "causal"].index(kind))
    tokens, positions, mask = _prompt(kind, 24, 15, rng)
    weights = weights_of(tiny_model)
    ref = oracle.forward(weights, tiny_model.config.__dict__, tokens, positions, mask)
    pos = torch.from_numpy(positions)
    cos, sin = tiny_model.rotary_cos[pos].unsqueeze(1), tiny_model.rotary_sin[pos].unsqueeze(1)
    inputs = [weights["word_embeddings.weight"][tokens], *ref["hidden_states"][:-1]]
    with torch.no_grad():
        for i, layer in enumerate(tiny_model.layers):
            out, _ = layer(torch.from_numpy(inputs[i]).float(), cos, sin, torch.from_numpy(mask), None,
                           tiny_model.comm)
            assert_close(out, ref["hidden_states"][i], "float32-layer", f"{kind} layer {i}")
        x = tiny_model.final_layernorm(torch.from_numpy(ref["hidden_states"][-1]).float())
        logits = torch.nn.functional.linear(x, tiny_model.word_embeddings.weight)
    assert_close(logits, ref["logits"], "float32-layer", f"{kind} final norm and output projection")


def test_cached_decoding_equals_recomputation(tiny_model):
    rng = np.random.default_rng(3)
    tokens, positions, mask = _prompt("gmask", 20, 12, rng)
    tokens, positions, mask = map(torch.from_numpy, (tokens, positions, mask))
    with torch.no_grad():
        full = tiny_model(tokens, positions, mask).logits
        out = tiny_model(tokens[:, :12], positions[:, :12], mask[..., :12, :12])
        steps = [out.logits[:, -1]]
        cache = out.kv_cache
        for i in range(12, 20):
            out = tiny_model(tokens[:, i:i + 1], positions[:, i:i + 1], mask[..., i:i + 1, :i + 1], cache)
            cache = out.kv_cache
            steps.append(out.logits[:, -1])
    assert_close(torch.stack(steps[:-1], 1), full[:, 11:19], "float32", "cached step logits")
    assert cache[0][0].shape[2] == 20


def test_padded_batch_equals_single_prompts(tiny_model):
    rng = np.random.default_rng(4)
    singles = [_prompt("gmask", n, n - 3, rng) for n in (9, 16)]
    width = 16
    tokens = np.zeros((2, width), dtype=np.int64)
    positions = np.zeros((2, width), dtype=np.int64)
    mask = np.ones((2, 1, width, width), dtype=bool)
    for row, (t, p, m) in enumerate(singles):  # left padding, masked out
        pad = width - t.shape[1]
        tokens[row, pad:], positions[row, pad:] = t[0], p[0]
        mask[row, 0, pad:, pad:] = m[0, 0]
        mask[row, 0, :pad, pad:] = False
    with torch.no_grad():
        batch = tiny_model(torch.from_numpy(tokens), torch.from_numpy(positions), torch.from_numpy(mask)).logits
        for row, (t, p, m) in enumerate(singles):
            alone = tiny_model(*map(torch.from_numpy, (t, p, m))).logits
            assert_close(batch[row, width - t.shape[1]:], alone[0], "float32", f"padded row {row}")


def test_rotary_table_is_sats_fp16_table():
    cos, sin = sat_rotary_table(2048, 128, 10000, torch.float16)
    ref_cos, ref_sin = oracle.rotary_table(2048, 128)
    assert np.array_equal(cos.numpy(), ref_cos) and np.array_equal(sin.numpy(), ref_sin)
    # fp32 models hold the very same (fp16) values; an exact fp32 table would differ.
    cos32, _ = sat_rotary_table(2048, 128, 10000, torch.float32)
    assert torch.equal(cos32, cos.float())
    exact = torch.cos(torch.outer(torch.arange(2048.0), 1.0 / 10000 ** (torch.arange(0, 128, 2) / 128.0)))
    assert (torch.cat([exact, exact], -1) - cos32).abs().max() > 0.1


def test_bf16_table_takes_fp32_cos_of_fp16_angles():
    cos, _ = sat_rotary_table(64, 16, 10000, torch.bfloat16)
    inv = (1.0 / (10000 ** (np.arange(0, 16, 2, dtype=np.float32) / 16))).astype(np.float16)
    angles = (np.arange(64, dtype=np.float16)[:, None] * inv).astype(np.float16)
    cos32 = np.cos(np.concatenate([angles, angles], -1).astype(np.float64)).astype(np.float32)
    expected = torch.from_numpy(cos32).bfloat16()
    assert torch.equal(cos, expected)


def test_masked_scores_reach_the_softmax_at_minus_10000_times_layer(tiny_model, monkeypatch):
    """Query-key layer scaling is invisible in exact arithmetic; its trace is the masked value."""
    rng = np.random.default_rng(7)
    tokens, positions, mask = map(torch.from_numpy, _prompt("gmask", 10, 6, rng))
    inputs = []
    original = torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda x, dim=None, **kw: (inputs.append(x), original(x, dim=dim, **kw))[1])
    with torch.no_grad():
        tiny_model(tokens, positions, mask)
    assert len(inputs) == tiny_model.config.num_layers
    for layer, scores in enumerate(inputs):
        masked = scores[mask.expand_as(scores)]
        assert masked.numel() > 0 and torch.all(masked == -10000.0 * (layer + 1)), layer


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_and_keeps_softmax_fp32(tiny_model, dtype):
    model = GLMModel(tiny_model.config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in tiny_model.state_dict().items()}, strict=False)
    rng = np.random.default_rng(5)
    tokens, positions, mask = map(torch.from_numpy, _prompt("gmask", 12, 8, rng))
    seen = []
    original = torch.softmax

    def spy(x, dim=None, **kwargs):
        seen.append(x.dtype)
        return original(x, dim=dim, **kwargs)

    torch.softmax = spy
    try:
        with torch.no_grad():
            logits = model(tokens, positions, mask).logits
    finally:
        torch.softmax = original
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()
    assert seen == [torch.float32] * tiny_model.config.num_layers


def test_training_gradients_and_embedding_shrink(tiny_config):
    rng = np.random.default_rng(6)
    tokens, positions, mask = map(torch.from_numpy, _prompt("gmask", 10, 6, rng))
    grads = {}
    for scale in (1.0, 0.1):
        model = init_wide_random_(GLMModel(tiny_config, embedding_grad_scale=scale), seed=2).train()
        logits = model(tokens, positions, mask).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
        loss.backward()
        grads[scale] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads[scale].values())
    emb = "word_embeddings.weight"
    # Tied weights: the output projection's gradient is untouched, only the input path shrinks.
    with torch.no_grad():
        model = init_wide_random_(GLMModel(tiny_config), seed=2)
    output_only = _output_projection_grad(model, tokens, positions, mask)
    expected = output_only + 0.1 * (grads[1.0][emb] - output_only)
    assert torch.allclose(grads[0.1][emb], expected, rtol=1e-5, atol=1e-7)
    for name in grads[1.0]:
        if name != emb:
            assert torch.allclose(grads[0.1][name], grads[1.0][name], rtol=1e-5, atol=1e-7), name


def _output_projection_grad(model, tokens, positions, mask) -> torch.Tensor:
    """Gradient reaching the tied embedding through the logits only (input path detached)."""
    weight = model.word_embeddings.weight
    hidden = {}

    def keep(module, inputs, output):
        hidden["x"] = output

    handle = model.final_layernorm.register_forward_hook(keep)
    model(tokens, positions, mask)
    handle.remove()
    x = hidden["x"].detach()
    w = weight.detach().clone().requires_grad_(True)
    logits = torch.nn.functional.linear(x, w)
    torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]).backward()
    return w.grad
