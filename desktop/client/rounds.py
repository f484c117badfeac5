"""A speculative round as the edge sends it, and the timed drafting that makes one."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specd.desktop.drafters.base import Drafter, DraftProposal
from specd.shared.sampling import ProposalDistribution, SamplingParams


@dataclass(slots=True)
class SentRound:
    """A round in flight: the committed sequence its drafts continue, the drafts, and what they cost."""

    number: int
    prefix: list[int]
    tokens: list[int]
    draft_ms: float
    ahead: bool  # drafted during the previous round's verification (it assumed that round's outcome)
    sent_at: float = 0.0
    context: int = 0  # how many of the drafts, from the first, the context lookup proposed
    matched: int = 0  # how many tokens the lookup matched to find them
    found: tuple[int, ...] = ()  # what the lookup proposed for this round, used or not


def propose_timed(drafter: Drafter, prefix: list[int], gamma: int, sampling: SamplingParams, support_k: int,
                  seed: int, stop: frozenset[int],
                  guess: Callable[[Sequence[int]], Sequence[int]] | None = None) -> tuple[DraftProposal, float]:
    """``drafter.propose`` (which reconciles its cache with ``prefix``) and the milliseconds it took."""
    start = time.perf_counter()
    proposal = drafter.propose(prefix, gamma, sampling, support_k, seed, stop, guess)
    return proposal, (time.perf_counter() - start) * 1000.0


def merge(pieces: list[DraftProposal]) -> DraftProposal:
    """Drafts proposed one after another as one round."""
    tokens = [t for piece in pieces for t in piece.tokens]
    if pieces[0].proposal is None:
        return DraftProposal(tokens=tokens, proposal=None)
    return DraftProposal(tokens=tokens, proposal=ProposalDistribution(
        ids=torch.cat([p.proposal.ids for p in pieces]), probs=torch.cat([p.proposal.probs for p in pieces])))


def with_lookup(lookup: Sequence[int], model: DraftProposal | None, greedy: bool) -> DraftProposal:
    """A round of looked-up tokens, then the model's drafts (if any). Each looked-up token is proposed with
    q = 1 on itself: a one-token support, which the verifier's rule takes like any other (it accepts the
    token with probability p(token) and otherwise samples the residual, p without it). In a round with
    model drafts its row is padded to the model's K with distinct ids at q = 0."""
    tokens = [*lookup, *(model.tokens if model is not None else [])]
    if greedy or not lookup:
        return DraftProposal(tokens=tokens, proposal=None if greedy else model.proposal)
    support = model.proposal.support_size if model is not None and model.proposal is not None else 1
    ids = torch.zeros((len(lookup), support), dtype=torch.int64)
    probs = torch.zeros((len(lookup), support), dtype=torch.float32)
    for row, token in enumerate(lookup):
        padding = [i for i in range(support) if i != token][: support - 1]
        ids[row] = torch.tensor([token, *padding], dtype=torch.int64)
        probs[row, 0] = 1.0
    if model is not None and model.proposal is not None:
        ids, probs = torch.cat([ids, model.proposal.ids]), torch.cat([probs, model.proposal.probs])
    return DraftProposal(tokens=tokens, proposal=ProposalDistribution(ids=ids, probs=probs))
