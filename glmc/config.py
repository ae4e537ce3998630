"""Model configuration and tensor-parallel layout, as plain values."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from glmc.errors import GlmcError


# Absolute limits of each integer field: far beyond any GLM (GLM-130B: 70 layers, hidden 12,288,
# 96 heads, GeGLU 32,768, vocabulary 150,528, 2,048 positions), near enough that no size computed
# from them overflows and no loop over them runs for long. Positions stop at 65,504, the largest
# the fp16 position column of SAT's rotary table holds (beyond it the angles are infinite).
INT_FIELD_BOUNDS: dict[str, tuple[int, int]] = {
    "num_layers": (1, 4096),
    "hidden_size": (2, 1 << 17),
    "num_attention_heads": (1, 1 << 13),
    "inner_hidden_size": (1, 1 << 20),
    "vocab_size": (1, 1 << 24),
    "max_sequence_length": (1, 65504),
    "rotary_base": (2, 1 << 31),
}


def _shown(value: Any, limit: int = 60) -> str:
    """A value as JSON writes it (null, true, "3"), cut to `limit` characters for messages."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class GLMConfig:
    """Architecture of a GLM-130B-class model (SAT's `GLM130B` arguments)."""

    num_layers: int  # transformer layers (GLM-130B: 70)
    hidden_size: int  # model width h (12,288)
    num_attention_heads: int  # heads; head dim = hidden / heads (96 -> 128)
    inner_hidden_size: int  # GeGLU width; dense_h_to_4h is 2 x this wide (32,768)
    vocab_size: int  # padded vocabulary, rows of the tied embedding (150,528)
    max_sequence_length: int  # longest context + generation (2,048)
    layernorm_epsilon: float = 1e-5  # SAT's default
    rotary_base: int = 10000  # RoPE base over the full head dim

    def __post_init__(self) -> None:
        # Packages and checkpoints build configs from JSON: every field is checked here, type
        # included (JSON's true is not 1, 3.0 is not 3), so a hostile file fails in one line.
        for field, (low, high) in INT_FIELD_BOUNDS.items():
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise GlmcError(f"config: {field} must be an integer, got {_shown(value)}")
            if not low <= value <= high:
                raise GlmcError(f"config: {field} must lie in [{low}, {high:,}], got {value:,}")
        epsilon = self.layernorm_epsilon
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or not 0 < epsilon <= 1:
            raise GlmcError(f"config: layernorm_epsilon must be a number in (0, 1], got {_shown(epsilon)}")
        object.__setattr__(self, "layernorm_epsilon", float(epsilon))
        if self.hidden_size % self.num_attention_heads:
            raise GlmcError(f"config: hidden_size {self.hidden_size} is not a multiple of "
                            f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            raise GlmcError(f"config: head dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def deepnorm_alpha(self) -> float:
        # DeepNorm residual scale: x * alpha + sublayer(x), alpha = sqrt(2N).
        return math.sqrt(2 * self.num_layers)

    def check_mapping(self, mapping: "Mapping") -> None:
        """Raise if this model cannot be split `mapping.tp_size` ways."""
        for name, size in (("num_attention_heads", self.num_attention_heads),
                           ("inner_hidden_size", self.inner_hidden_size),
                           ("vocab_size", self.vocab_size)):
            if size % mapping.tp_size:
                raise GlmcError(f"tensor-parallel degree {mapping.tp_size} does not divide "
                                f"{name} {size}")

    def parameter_count(self) -> int:
        h, i = self.hidden_size, self.inner_hidden_size
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + (2 * i * h + 2 * i) + (i * h + h) + 4 * h
        return self.vocab_size * h + self.num_layers * per_layer + 2 * h

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> "GLMConfig":
        if not isinstance(values, dict):
            raise GlmcError(f"config: expected an object of fields, got {type(values).__name__}")
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        unknown = sorted(map(str, set(values) - names))
        if unknown:
            raise GlmcError(f"config: unknown field(s) {_shown(', '.join(unknown))}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise GlmcError(f"config: missing {', '.join(missing)}")
        return cls(**values)


PRESETS: dict[str, GLMConfig] = {
    # The published model (configs/model_glm_130b.sh).
    "glm-130b": GLMConfig(num_layers=70, hidden_size=12288, num_attention_heads=96,
                          inner_hidden_size=32768, vocab_size=150528, max_sequence_length=2048),
    # Tests: 8 heads so that TP 1, 2, 4 and 8 all divide; 3 layers so that the
    # query-key layer scaling sees coefficients 1, 2 and 3.
    "glm-tiny": GLMConfig(num_layers=3, hidden_size=64, num_attention_heads=8,
                          inner_hidden_size=128, vocab_size=1024, max_sequence_length=128),
    # The embedded default model, trained by `glmc train` on data/corpus (8,000 text
    # pieces + the commands, padded). One layer: with DeepNorm's residual scale
    # sqrt(2N), deeper models sat at the unigram loss (~7.0) for hundreds of steps on
    # two CPU cores, while one layer leaves it after ~150.
    "glm-demo": GLMConfig(num_layers=1, hidden_size=256, num_attention_heads=8,
                          inner_hidden_size=672, vocab_size=8192, max_sequence_length=512),
    # CPU benchmarks: ~1.2 GB of fp32 weights with the real vocabulary, so that
    # the output projection weighs what it does in GLM-130B.
    "glm-bench": GLMConfig(num_layers=12, hidden_size=1024, num_attention_heads=16,
                           inner_hidden_size=2736, vocab_size=150528, max_sequence_length=2048),
}


def from_name(name: str) -> GLMConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise GlmcError(f"unknown model config '{name}': choose from {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class Mapping:
    """Which tensor-parallel rank this process is, out of how many."""

    tp_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise GlmcError(f"tensor-parallel degree must be >= 1, got {self.tp_size}")
        if not 0 <= self.rank < self.tp_size:
            raise GlmcError(f"rank {self.rank} is outside tensor-parallel degree {self.tp_size}")

    def to_dict(self) -> dict[str, int]:
        return {"tp_size": self.tp_size, "rank": self.rank}
