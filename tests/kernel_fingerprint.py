"""A fingerprint of how this machine's CPU kernels round the ops the golden data went through.

Bit-identity with the SAT golden data needs the same kernels that made it. Pinning
torch's own dispatch (ATEN_CPU_CAPABILITY), oneDNN's (ONEDNN_MAX_CPU_ISA) and MKL's
(MKL_ENABLE_INSTRUCTIONS) to AVX2 on one thread covers what the environment can
choose; MKL and oneDNN still pick kernels by CPU model (an Intel and an AMD CPU with
the same instruction sets may differ). So the bit-exact test first hashes these
probe ops, at the golden model's shapes and dtypes, in its pinned environment, and
runs only where the hash equals the one recorded on the machine where bit-identity
was measured: a different hash means different kernels, not a glmc bug. The probe
uses torch alone, never glmc, so a glmc regression cannot make the test skip.

    python tests/kernel_fingerprint.py          # prints the hash of this machine
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

HIDDEN, HEADS, INNER, VOCAB = 64, 8, 128, 1024  # the golden model (tests/data/sat_oracle)
ROWS = range(1, 49)  # batch x sequence rows of every golden forward, prefill and decode


def fingerprint() -> str:
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    weights = {name: randn(out, inp) for name, (out, inp) in {
        "qkv": (3 * HIDDEN, HIDDEN), "dense": (HIDDEN, HIDDEN), "h_to_4h": (2 * INNER, HIDDEN),
        "4h_to_h": (HIDDEN, INNER), "logits": (VOCAB, HIDDEN)}.items()}
    digest = hashlib.sha256()
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16):
            for rows in ROWS:
                x = randn(rows, HIDDEN).to(dtype)
                for name, w in weights.items():
                    inputs = randn(rows, w.shape[1]).to(dtype) if w.shape[1] != HIDDEN else x
                    digest.update(F.linear(inputs, w.to(dtype)).numpy().tobytes())
                q, k = randn(1, HEADS, rows, HIDDEN // HEADS).to(dtype), randn(1, HEADS, rows, HIDDEN // HEADS).to(dtype)
                scores = torch.matmul(q, k.transpose(-1, -2))
                probs = torch.softmax(scores.float() * 2.0, dim=-1).to(dtype)
                digest.update(scores.numpy().tobytes() + probs.numpy().tobytes())
                digest.update(torch.matmul(probs, k).numpy().tobytes())
                digest.update(F.layer_norm(x, (HIDDEN,), randn(HIDDEN).to(dtype), randn(HIDDEN).to(dtype),
                                           1e-5).numpy().tobytes())
                digest.update(F.gelu(x).numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    print(fingerprint())
