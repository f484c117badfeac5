"""A speculative round as the edge sends it, and the timed drafting that makes one."""

from __future__ import annotations

import time
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


def propose_timed(drafter: Drafter, prefix: list[int], gamma: int, sampling: SamplingParams, support_k: int,
                  seed: int, stop: frozenset[int]) -> tuple[DraftProposal, float]:
    """``drafter.propose`` (which reconciles its cache with ``prefix``) and the milliseconds it took."""
    start = time.perf_counter()
    proposal = drafter.propose(prefix, gamma, sampling, support_k, seed, stop)
    return proposal, (time.perf_counter() - start) * 1000.0


def merge(pieces: list[DraftProposal]) -> DraftProposal:
    """Drafts proposed one after another as one round."""
    tokens = [t for piece in pieces for t in piece.tokens]
    if pieces[0].proposal is None:
        return DraftProposal(tokens=tokens, proposal=None)
    return DraftProposal(tokens=tokens, proposal=ProposalDistribution(
        ids=torch.cat([p.proposal.ids for p in pieces]), probs=torch.cat([p.proposal.probs for p in pieces])))
