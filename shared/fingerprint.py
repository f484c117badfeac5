"""Tokenizer fingerprints: both sides must agree on what every token id means."""

from __future__ import annotations

import hashlib
import json
from typing import Protocol


class _HasVocab(Protocol):
    def get_vocab(self) -> dict[str, int]: ...


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    """A hash of the whole id ↔ token mapping, special and added tokens included."""
    canonical = json.dumps(sorted(vocab.items(), key=lambda item: (item[1], item[0])),
                           ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer: _HasVocab) -> str:
    """Fingerprint of a Hugging Face tokenizer (or anything with ``get_vocab()``).

    Only the vocabulary counts: two models of one family (Llama 3.2 1B and 3.1 8B) share it even
    when their chat templates differ, and then their token ids mean the same thing.
    """
    return vocab_fingerprint(tokenizer.get_vocab())
