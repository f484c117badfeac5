"""Client frames built by hand (msgpack maps), as a client written from docs/protocol.md alone builds them.

The tests that break the protocol on purpose (abuse, protocol rules) share these: the tiny tokenizer's
fingerprint, a three-token prompt (position 3 is next, parent 6), and ``start``/``draft`` frames whose
fields a test overrides one at a time.
"""

from __future__ import annotations

import msgspec

from specd.shared.fingerprint import tokenizer_fingerprint
from tests.tiny_models import tiny_tokenizer

FINGERPRINT = tokenizer_fingerprint(tiny_tokenizer())
GREEDY = {"temperature": 0.0}
SAMPLED = {"temperature": 1.0}
PROMPT = [1, 5, 6]  # position 3 is next, parent 6


def enc(raw: dict) -> bytes:
    return msgspec.msgpack.encode(raw)


def start(request: int = 0, sampling: dict = GREEDY, **fields) -> bytes:
    return enc({"type": "start", "request": request, "prompt": PROMPT, "max_new_tokens": 20, "sampling": sampling,
                **fields})


def draft(tokens: list[int], *, round_: int = 0, position: int = 3, parent: int = 6, request: int = 0,
          **fields) -> bytes:
    return enc({"type": "draft", "request": request, "round": round_, "position": position, "parent": parent,
                "tokens": tokens, **fields})
