"""Drafts that cost nothing: the continuation of the longest earlier match of what was just written.

Much of what people ask a model repeats text already in the conversation (edit this code, fix this
paragraph, answer from this document, quote the last answer). :class:`ContextLookup` indexes the committed
tokens — prompt (which holds the earlier turns), and the answer so far — in a suffix automaton, built
online in amortised O(1) per token, so a round's lookup walks a few states instead of rescanning the
conversation. For a prefix (the committed tokens, maybe followed by drafts still in flight) it finds the
longest suffix that also occurs earlier in the committed tokens and proposes what followed that occurrence.

Like every draft source it is handed the committed ids and reconciles itself (:meth:`ContextLookup.sync`):
tokens that extend what it indexed are appended; anything else (a new conversation) is indexed afresh.
No torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

# A one-token match is mostly chance (a comma, "the"): propose only after this many tokens agree.
MIN_MATCH = 2


class ContextLookup:
    """A suffix automaton over the committed tokens (states: ``_next`` transitions, ``_link`` suffix links,
    ``_length`` longest string, ``_first_end`` where that string first ends)."""

    def __init__(self, min_match: int = MIN_MATCH) -> None:
        self.min_match = min_match
        self._tokens: list[int] = []
        self._reset()

    def _reset(self) -> None:
        self._tokens = []
        self._next: list[dict[int, int]] = [{}]
        self._link: list[int] = [-1]
        self._length: list[int] = [0]
        self._first_end: list[int] = [-1]
        self._last = 0

    @property
    def indexed(self) -> int:
        """How many committed tokens are indexed."""
        return len(self._tokens)

    def sync(self, committed: Sequence[int]) -> None:
        """Index ``committed``: append what extends the indexed tokens, start afresh when it does not."""
        n = len(self._tokens)
        if len(committed) < n or list(committed[:n]) != self._tokens:
            self._reset()
            n = 0
        for token in committed[n:]:
            self._append(int(token))

    def _append(self, token: int) -> None:
        position = len(self._tokens)
        self._tokens.append(token)
        nxt, link, length, first_end = self._next, self._link, self._length, self._first_end
        current = len(length)
        nxt.append({})
        link.append(0)
        length.append(length[self._last] + 1)
        first_end.append(position)
        state = self._last
        while state != -1 and token not in nxt[state]:
            nxt[state][token] = current
            state = link[state]
        if state != -1:
            target = nxt[state][token]
            if length[state] + 1 == length[target]:
                link[current] = target
            else:
                clone = len(length)
                nxt.append(dict(nxt[target]))
                link.append(link[target])
                length.append(length[state] + 1)
                first_end.append(first_end[target])
                while state != -1 and nxt[state].get(token) == target:
                    nxt[state][token] = clone
                    state = link[state]
                link[target] = link[current] = clone
        self._last = current

    def continuation(self, extra: Sequence[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the longest earlier match of ``committed + extra`` (the indexed
        tokens, then ``extra``, e.g. drafts in flight); [] when fewer than ``min_match`` tokens match."""
        return self.find(extra, limit)[0]

    def find(self, extra: Sequence[int], limit: int) -> tuple[list[int], int]:
        """:meth:`continuation`, and how many tokens matched (0 when nothing is proposed)."""
        if limit <= 0 or not self._tokens:
            return [], 0
        end = len(self._tokens) - 1
        # The longest suffix of the indexed tokens that occurs earlier too: the suffix link of the whole.
        state = self._link[self._last]
        matched = self._length[state] if state > 0 else 0
        state = max(state, 0)
        for token in extra:
            while state > 0 and token not in self._next[state]:
                state = self._link[state]
                matched = self._length[state]
            if token in self._next[state]:
                state = self._next[state][token]
                matched += 1
            else:
                state, matched = 0, 0
        # An occurrence needs a continuation: one that ends at the last token has none yet, so try the
        # next shorter suffix (its first occurrence ends earlier).
        while state > 0 and self._first_end[state] >= end:
            state = self._link[state]
            matched = self._length[state]
        if state <= 0 or matched < self.min_match:
            return [], 0
        start = self._first_end[state] + 1
        return self._tokens[start:start + limit], matched
