"""Why an answer ends after a token: the stop rules both roles apply (docs/protocol.md §3, ``reason``)."""

from __future__ import annotations

from collections.abc import Collection


def stop_reason(token: int, eos: Collection[int], stop: Collection[int]) -> str | None:
    """``eos`` or ``stop`` when ``token`` ends the answer by itself, else None."""
    if token in eos:
        return "eos"
    if token in stop:
        return "stop"
    return None

