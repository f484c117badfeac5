"""Wire layouts the two roles share, in plain Python: the proposal bytes and prefix comparison.

A ``draft`` carries its sparse proposal as two byte strings of γ×K little-endian values: ``q_ids``
int32, ``q_probs`` float32 (docs/protocol.md §3). The protocol only checks their size; turning them
into tensors (``shared/sampling.py``) and checking their content is the verifier's job, done once.
"""

from __future__ import annotations

from typing import NamedTuple

Q_IDS_DTYPE = "<i4"  # numpy spelling of the two layouts
Q_PROBS_DTYPE = "<f4"
_VALUE_BYTES = 4


class WireProposal(NamedTuple):
    """A proposal as a ``draft`` message carries it: ``support`` K and the two byte strings."""

    support: int
    q_ids: bytes
    q_probs: bytes


NO_PROPOSAL = WireProposal(0, b"", b"")  # greedy rounds send none


def proposal_bytes(gamma: int, support: int) -> int:
    """The size each of ``q_ids`` and ``q_probs`` must have for γ drafts with K candidates each."""
    return gamma * support * _VALUE_BYTES


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
