"""GLM's command tokens: fixed ids, not text pieces."""

from __future__ import annotations

from dataclasses import dataclass

# In id order from the command base (SAT's `_IceTokenizer.add_special_tokens`).
COMMANDS = ("[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the commands and of `eos` for one vocabulary."""

    mask: int
    gmask: int
    smask: int
    eod: int
    sop: int
    eop: int
    enc: int
    dblock: int
    eos: int

    @classmethod
    def from_base(cls, command_base: int, eos: int) -> "SpecialTokens":
        return cls(*(command_base + i for i in range(len(COMMANDS))), eos=eos)

    @classmethod
    def from_dict(cls, ids: dict[str, int]) -> "SpecialTokens":
        return cls(*(int(ids[name]) for name in COMMANDS), eos=int(ids["eos"]))

    def to_dict(self) -> dict[str, int]:
        return {name: self.command(name) for name in (*COMMANDS, "eos")}

    def command(self, name: str) -> int:
        """Id of "[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK" or "eos"."""
        if name == "eos":
            return self.eos
        return (self.mask, self.gmask, self.smask, self.eod, self.sop, self.eop, self.enc,
                self.dblock)[COMMANDS.index(name)]

    @property
    def end_tokens(self) -> tuple[int, int]:
        """Generation stops at either (GLM-130B's generate.py)."""
        return (self.eop, self.eos)

    def names(self) -> dict[int, str]:
        """Id -> how SAT prints it when detokenizing: `[name]`, and `[</s>]` for eos."""
        names = {self.command(n): n for n in COMMANDS}
        names[self.eos] = "</s>"
        return names


# GLM-130B: icetk's 20,000 image ids, then 130,000 text pieces, then the commands;
# eos is the text model's `</s>` (piece 2).
GLM130B_SPECIAL_TOKENS = SpecialTokens.from_base(150000, eos=20002)
