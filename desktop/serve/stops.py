"""Stop sequences in streamed text: matched across token (and piece) boundaries, never emitted.

Text arrives in pieces whose borders fall anywhere in a stop sequence (``"</"`` then ``"s>"``). The
matcher holds back the longest tail that could still begin a stop sequence, so what it lets out can
never be retracted, and cuts the text where the earliest stop sequence begins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StopMatcher:
    """Feed streamed text with :meth:`push`; it returns what is safe to show. ``stop`` is the stop
    sequence found (None while none is), and ``text`` all text let out."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stop: str | None = None
        self.text = ""
        self._held = ""

    def push(self, piece: str) -> str:
        if self.stop is not None:
            return ""
        buffer = self._held + piece
        found = [(buffer.find(s), s) for s in self.stops if s in buffer]
        if found:
            cut, self.stop = min(found)
            self._held = ""
            return self._out(buffer[:cut])
        hold = max((_partial(buffer, s) for s in self.stops), default=0)
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return self._out(buffer[:len(buffer) - hold])

    def flush(self) -> str:
        """The answer ended without a stop sequence: the held-back tail is plain text after all."""
        held, self._held = self._held, ""
        return self._out(held)

    def _out(self, text: str) -> str:
        self.text += text
        return text


def _partial(text: str, stop: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``stop``."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def tokens_through(tokenizer: Any, token_ids: Sequence[int], chars: int) -> int:
    """How many of ``token_ids`` it takes to produce the first ``chars`` characters of their text: the
    tokens an answer cut by a stop sequence really used, however its rounds were split."""
    lo, hi = 0, len(token_ids)
    while lo < hi:  # the decoded length only grows with more tokens: bisect on it
        mid = (lo + hi) // 2
        if len(tokenizer.decode(list(token_ids[:mid + 1]), skip_special_tokens=True)) >= chars:
            hi = mid
        else:
            lo = mid + 1
    return min(lo + 1, len(token_ids))
