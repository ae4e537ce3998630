"""glmc: run GLM-130B-class models faithfully and fast.

The stable Python API (see README):

    import glmc
    model = glmc.load("path/to/sat_checkpoint")           # or glmc.load() for the embedded model
    logits, cache = model.logits(tokens, position_ids, attention_mask)
    result = model.generate("Tsinghua University is in [MASK].",
                            strategy=glmc.BeamSearchStrategy(num_beams=4))
"""

from __future__ import annotations

__version__ = "0.1.0"

# Heavy modules (torch) load on first use so that `glmc --help` stays fast.
_LAZY = {
    "GLMConfig": "glmc.config",
    "Mapping": "glmc.config",
    "PRESETS": "glmc.config",
    "GlmcError": "glmc.errors",
    "load": "glmc.api",
    "open_model": "glmc.api",
    "GLM": "glmc.api",
    "RunSpec": "glmc.run_spec",
    "BaseStrategy": "glmc.generation.strategies",
    "BeamSearchStrategy": "glmc.generation.strategies",
    "SpecialTokens": "glmc.tokenizer.special",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'glmc' has no attribute {name!r}")
