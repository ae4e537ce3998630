"""What every pass shares: the target it optimises for, and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from glmc.errors import GlmcError


@dataclass(frozen=True)
class Target:
    """The backend a graph is optimised for, as the ops it can run."""

    name: str
    fused_attention: bool  # opset-23 Attention
    fused_rotary: bool  # opset-23 RotaryEmbedding
    geglu_function: bool  # GeGLU as a glmc local function (a backend that inlines functions)
    microsoft_ops: bool  # com.microsoft contrib ops
    static_kv_cache: bool  # KV buffers written in place (GroupQueryAttention), not concatenated

    def to_dict(self) -> dict:
        return dict(self.__dict__)


TARGETS: dict[str, Target] = {
    # ONNX Runtime runs opset-23 Attention (past K/V, softmax_precision) and RotaryEmbedding.
    "onnxruntime": Target("onnxruntime", fused_attention=True, fused_rotary=True, geglu_function=True,
                          microsoft_ops=True, static_kv_cache=True),
    # TensorRT fuses attention written in primitives itself; its support of opset-23
    # Attention/RotaryEmbedding is recent and reported fragile, and it has no com.microsoft ops.
    "tensorrt": Target("tensorrt", fused_attention=False, fused_rotary=False, geglu_function=False,
                       microsoft_ops=False, static_kv_cache=False),
    # No fusion at all: the baseline the benchmarks compare the fused graphs with.
    "unfused": Target("unfused", fused_attention=False, fused_rotary=False, geglu_function=False,
                      microsoft_ops=False, static_kv_cache=False),
}


def target_named(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise GlmcError(f"unknown target '{name}': choose from {', '.join(TARGETS)}") from None


@dataclass
class PassOutcome:
    """How many rewrites a pass made, and why it declined the matches it did not rewrite."""

    name: str
    count: int = 0
    declined: list[str] = field(default_factory=list)


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant (initializer or Constant node output), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def scalar(value: ir.Value | None) -> float | None:
    array = constant(value)
    return None if array is None or array.size != 1 else array.item()


def ints(value: ir.Value | None) -> list[int] | None:
    array = constant(value)
    return None if array is None else [int(v) for v in array.reshape(-1)]
