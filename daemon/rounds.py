"""What a session does with the logits the engine hands back: a round's verdict, a cloud step's token.

Both run on the model thread right after the forward (engine.py ``finish``). The random draws come
from ``(seed, position, stream)`` on the CPU, so a client computing the same round locally (or a
resumed request) gets the same answer whatever the server's device or batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specd.shared import messages as m
from specd.shared.sampling import (
    CLOUD_STREAM,
    VERIFY_STREAM,
    SamplingParams,
    decode_proposal,
    position_generator,
    sample,
    target_probs,
    validate_proposal,
    verify_greedy,
    verify_validated,
)


def request_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random one when the client left it to the server."""
    return seed if seed is not None else secrets.randbits(63)


@dataclass(frozen=True, slots=True)
class RoundDrafts:
    """One round's drafts as tensors; a sampled round adds its proposal, checked (once) on receipt."""

    draft_ids: torch.Tensor  # [γ] int64
    ids: torch.Tensor | None = None  # [γ, K] int64, the proposal's support
    q: torch.Tensor | None = None  # [γ, K] float32, normalised by validate_proposal


def decode_round(draft: m.Draft, greedy: bool, vocab_size: int) -> RoundDrafts:
    """Decode and check a round the session accepted; raises ``ProposalError`` for a bad proposal."""
    draft_ids = torch.tensor(draft.tokens, dtype=torch.int64)
    if greedy:
        return RoundDrafts(draft_ids)
    proposal = decode_proposal(draft.q_ids, draft.q_probs, len(draft.tokens), draft.support)
    return RoundDrafts(draft_ids, proposal.ids, validate_proposal(draft_ids, proposal, vocab_size))


@dataclass(frozen=True, slots=True)
class JudgedRound:
    """A round's verdict: of the first ``verified`` drafts (the goodput budget may verify a prefix; the
    rest were not judged), ``accepted`` stand, then ``token``."""

    accepted: int
    token: int
    verified: int


def round_verdict(drafts: RoundDrafts, params: SamplingParams, seed: int,
                  position: int) -> Callable[[torch.Tensor], JudgedRound]:
    """The verdict on a round from the logits of ``[parent] + drafts[:k]`` (docs/protocol.md §4).

    ``position`` is the index of the first draft token (the committed length). When the engine ran
    only the first ``k`` drafts (``k + 1`` rows of logits) the round is judged as one of ``k`` drafts:
    the same rule on a shorter round, so still lossless; ``k = 0`` samples the target's next token.
    """

    def finish(logits: torch.Tensor) -> JudgedRound:
        k = int(logits.shape[0]) - 1
        if not 0 <= k <= int(drafts.draft_ids.shape[0]):
            raise ValueError(f"{logits.shape[0]} rows of logits for a round of {drafts.draft_ids.shape[0]} drafts")
        if drafts.q is None:
            result = verify_greedy(drafts.draft_ids[:k].to(logits.device), logits)
        else:
            assert drafts.ids is not None
            p = target_probs(logits.cpu(), params)
            result = verify_validated(drafts.draft_ids[:k], drafts.ids[:k], drafts.q[:k], p,
                                      position_generator(seed, position, VERIFY_STREAM))
        return JudgedRound(accepted=result.accepted, token=result.token, verified=k)

    return finish


def cloud_token(params: SamplingParams, seed: int, position: int) -> Callable[[torch.Tensor], tuple[int, float]]:
    """The target's next token (cloud-only mode) from the logits of the last committed token, and its
    probability under the request's sampling (1 when greedy): a streamed token's ``probs`` entry."""

    def finish(logits: torch.Tensor) -> tuple[int, float]:
        last = logits[-1]
        if params.greedy:
            return int(last.argmax()), 1.0
        probs = target_probs(last.cpu(), params)
        token = sample(probs, position_generator(seed, position, CLOUD_STREAM))
        return token, min(1.0, float(probs[token]))

    return finish
