"""What a session does with the logits the engine hands back: a round's verdict, a cloud step's token.

Both run on the model thread right after the forward (engine.py ``finish``). The random draws come
from ``(seed, position, stream)`` on the CPU, so a client computing the same round locally (or a
resumed request) gets the same answer whatever the server's device or batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import torch

from specd.shared.sampling import (
    CLOUD_STREAM,
    VERIFY_STREAM,
    ProposalDistribution,
    RoundResult,
    SamplingParams,
    position_generator,
    sample,
    target_probs,
    verify_greedy,
    verify_round,
)


def request_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random one when the client left it to the server."""
    return seed if seed is not None else secrets.randbits(63)


def round_verdict(draft_ids: torch.Tensor, proposal: ProposalDistribution | None, greedy: bool,
                  params: SamplingParams, seed: int, position: int) -> Callable[[torch.Tensor], RoundResult]:
    """The verdict on ``draft_ids`` from the logits of ``[parent] + drafts`` (docs/protocol.md §4).

    ``position`` is the index of the first draft token (the committed length).
    """

    def finish(logits: torch.Tensor) -> RoundResult:
        if greedy:
            return verify_greedy(draft_ids.to(logits.device), logits)
        assert proposal is not None
        p = target_probs(logits.cpu(), params)
        return verify_round(draft_ids, proposal, p, position_generator(seed, position, VERIFY_STREAM))

    return finish


def cloud_token(params: SamplingParams, seed: int, position: int) -> Callable[[torch.Tensor], int]:
    """The target's next token (cloud-only mode) from the logits of the last committed token."""

    def finish(logits: torch.Tensor) -> int:
        last = logits[-1]
        if params.greedy:
            return int(last.argmax())
        return sample(target_probs(last.cpu(), params), position_generator(seed, position, CLOUD_STREAM))

    return finish
