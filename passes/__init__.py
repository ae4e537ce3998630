"""Graph optimisation passes: one file per pass, with its pattern, check and rewrite.

`optimize(model, target)` applies them in order and returns per-pass counts.
"""

from __future__ import annotations

import onnx_ir as ir

from glmc.passes import (
    attention_3d,
    cleanup,
    fp32_softmax,
    fuse_attention,
    fuse_geglu,
    fuse_rotary,
    prepack_weights,
    static_kv_cache,
    tensorrt_ops,
    weight_only_matmul,
)
from glmc.passes.base import TARGETS, PassOutcome, Target, target_named

# Order matters:
# 1. prepack_weights first, while every matmul still reads Transpose(W): the weights
#    are then stored once, transposed lazily, before constant folding could copy them.
# 2. cleanup folds the exporter's constants and sequences into plain nodes, which the
#    fusion patterns expect.
# 3. rotary before attention: the attention pattern starts at the rotated q and k.
# 4. attention_3d after both: it moves the fused pair onto [b, s, hidden] tensors.
# 5. GeGLU is independent of all three.
# 6. fp32_softmax after the fusions, so it sees what remains of Softmax and the new
#    Attention nodes alike.
# 7. static_kv_cache after fp32_softmax: it takes the fused Attention (3-D, FP32 softmax)
#    to GroupQueryAttention writing the cache in place.
# 8. cleanup again drops what the fusions left unused and merges repeated nodes.
# 9. weight_only_matmul after the cleanups, which would fold a small dequantization of
#    constant codes into a float initializer: the copy quantization exists to avoid.
# 10. tensorrt_ops last, on the graph as it will be written: a guard (tensorrt target only)
#    that TensorRT's ONNX parser takes every node.
PIPELINE = (prepack_weights, cleanup, fuse_rotary, fuse_attention, attention_3d, fuse_geglu, fp32_softmax,
            static_kv_cache, cleanup, weight_only_matmul, tensorrt_ops)


def optimize(model: ir.Model, target: Target | str) -> tuple[ir.Model, dict[str, int], dict[str, list[str]]]:
    """Optimise `model` in place for `target`: (model, rewrites per pass, decline reasons per pass)."""
    target = target_named(target) if isinstance(target, str) else target
    counts: dict[str, int] = {}
    declined: dict[str, list[str]] = {}
    for step, module in enumerate(PIPELINE):
        if target.name not in getattr(module, "ONLY_FOR", (target.name,)):
            continue  # a guard of another target's backend
        outcome: PassOutcome = module.run(model, target)
        key = outcome.name if outcome.name not in counts else f"{outcome.name}_{step}"
        counts[key] = outcome.count
        if outcome.declined:
            declined[key] = outcome.declined
    return model, counts, declined


__all__ = ["TARGETS", "PassOutcome", "Target", "optimize", "target_named"]
