"""Incremental, UTF-8-safe detokenisation for streaming text.

Decoding token by token breaks multi-byte characters (a token may hold half an emoji) and loses the
spaces some tokenizers attach to the following token. This decodes a short window of recent tokens
and only emits text once it no longer ends in an incomplete character — the approach of
text-generation-inference and vLLM.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6  # tokens of left context re-decoded with each step


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Feed token ids as they are committed; get back the new text, never a broken character."""

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._tokens: list[int] = []
        self._prefix = 0  # start of the window used as left context
        self._read = 0  # tokens whose text has been emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_ids: list[int]) -> str:
        """Add committed tokens; return the text they complete (possibly empty)."""
        self._tokens.extend(token_ids)
        before = self._decode(self._tokens[self._prefix:self._read])
        after = self._decode(self._tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""  # an incomplete character: wait for the next token
        delta = after[len(before):]
        self._read = len(self._tokens)
        self._prefix = max(0, self._read - CONTEXT_TOKENS)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is left at the end of the answer (even an incomplete character)."""
        if self._read == len(self._tokens):
            return ""
        before = self._decode(self._tokens[self._prefix:self._read])
        after = self._decode(self._tokens[self._prefix:])
        delta = after[len(before):]
        self._read = len(self._tokens)
        self.text += delta
        return delta
