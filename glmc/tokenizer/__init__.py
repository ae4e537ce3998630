"""GLM-130B's icetk-compatible tokenizer and its command ids."""

from glmc.tokenizer.ice import VARIANTS, IceTokenizer
from glmc.tokenizer.special import COMMANDS, GLM130B_SPECIAL_TOKENS, SpecialTokens

__all__ = ["COMMANDS", "GLM130B_SPECIAL_TOKENS", "IceTokenizer", "SpecialTokens", "VARIANTS"]
