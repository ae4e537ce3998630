"""A completion's text as its tokens come: what may be sent now, and where a stop string cuts it.

The blank is detokenized whole after every token; only a stable prefix is sent, so that
the streamed pieces add up to the text a non-streamed request returns. Held back until
the next token: a tail that may still become a stop string or icetk's `<n>` (which
decodes to a newline once complete), and a trailing U+FFFD (a character whose bytes
are not all generated yet).
"""

from __future__ import annotations

NEWLINE_PIECE = "<n>"  # icetk writes a newline so; the tokenizer turns it into "\n" once whole


class TextStream:
    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = stops
        self.held = (*stops, NEWLINE_PIECE)
        self.sent = ""  # what the client has been sent
        self.text = ""  # the text so far, cut at a stop string
        self.stopped = False  # a stop string was found: the text ends before it

    def update(self, text: str, final: bool = False) -> str:
        """The blank's whole text now; returns what to send (possibly nothing)."""
        if self.stopped:
            return ""
        cut = min((at for at in (text.find(s) for s in self.stops) if at >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        self.text = text
        safe = text if final else text[:len(text) - self._pending(text)].rstrip("\ufffd")
        if not safe.startswith(self.sent):  # an earlier piece decodes differently now: wait for more
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def _pending(self, text: str) -> int:
        """Length of the longest tail of `text` that begins one of the held strings."""
        longest = 0
        for held in self.held:
            for size in range(min(len(held) - 1, len(text)), longest, -1):
                if text.endswith(held[:size]):
                    longest = size
                    break
        return longest
