"""The one interface every draft backend implements (torch, onnxruntime-genai, openvino).

A drafter holds a token sequence and its own KV cache. The client keeps it equal to the committed
sequence (plus the drafts of the round in flight): ``propose`` appends γ sampled drafts, and after
the verdict ``rollback`` drops the rejected ones and ``append`` adds the target's token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specd.shared.sampling import (
    DRAFT_STREAM,
    ProposalDistribution,
    SamplingParams,
    position_generator,
    sample_proposal,
    sparse_proposal,
)

BACKENDS = ("torch", "onnxruntime-genai", "openvino")


@dataclass(frozen=True, slots=True)
class DraftProposal:
    """γ draft tokens and the sparse proposal each was sampled from (None when greedy)."""

    tokens: list[int]
    proposal: ProposalDistribution | None


class Drafter(ABC):
    """A draft model with its own KV cache. Not thread-safe: one caller at a time."""

    #: backend id, one of :data:`BACKENDS`
    backend: str = ""
    #: the device it runs on, e.g. ``cpu``, ``cuda:0``, ``npu``
    device: str = "cpu"
    #: a human name for the model
    model_name: str = ""

    # -- what each backend implements ----------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Size of the logits the model produces."""

    @property
    @abstractmethod
    def token_count(self) -> int:
        """Tokens in the drafter's sequence (its KV cache covers all but possibly the last)."""

    @abstractmethod
    def tokens(self) -> list[int]:
        """The drafter's current sequence."""

    @abstractmethod
    def append(self, token_ids: Sequence[int]) -> None:
        """Feed tokens after the current sequence (prompt, or the verifier's token)."""

    @abstractmethod
    def rollback(self, length: int) -> None:
        """Keep only the first ``length`` tokens; later model state must equal a fresh run."""

    @abstractmethod
    def next_logits(self) -> torch.Tensor:
        """float32 logits ``[V]`` for the token after the current sequence."""

    def close(self) -> None:  # noqa: B027 - optional hook; most backends free memory on garbage collection
        """Release the model; the drafter is unusable afterwards."""

    # -- shared behaviour ----------------------------------------------------------------------
    def prefill(self, token_ids: Sequence[int]) -> None:
        """Make the sequence exactly ``token_ids``, keeping the common prefix already cached."""
        current = self.tokens()
        keep = 0
        limit = min(len(current), len(token_ids))
        while keep < limit and current[keep] == token_ids[keep]:
            keep += 1
        if keep == len(token_ids) and keep == len(current):
            return
        # Re-feed at least one token so the next logits are fresh.
        keep = min(keep, len(token_ids) - 1)
        self.rollback(keep)
        self.append(token_ids[keep:])

    def propose(self, gamma: int, params: SamplingParams, support_k: int, seed: int) -> DraftProposal:
        """Sample γ drafts autoregressively, appending each; returns them with their proposals.

        The draw for the token at absolute position n uses ``position_generator(seed, n, DRAFT_STREAM)``,
        so the same prefix and seed give the same drafts however rounds are split.
        """
        tokens: list[int] = []
        ids: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for _ in range(gamma):
            logits = self.next_logits().unsqueeze(0)
            if params.greedy:
                token = int(logits.argmax(dim=-1))
            else:
                proposal = sparse_proposal(logits, params, support_k)
                generator = position_generator(seed, self.token_count, DRAFT_STREAM)
                token = int(sample_proposal(proposal, generator)[0])
                ids.append(proposal.ids[0])
                probs.append(proposal.probs[0])
            tokens.append(token)
            self.append([token])
        if params.greedy:
            return DraftProposal(tokens=tokens, proposal=None)
        return DraftProposal(tokens=tokens, proposal=ProposalDistribution(ids=torch.stack(ids),
                                                                          probs=torch.stack(probs)))

    def most_likely_next(self) -> int:
        """The draft's guess for the verifier's next token (used when drafting ahead)."""
        return int(self.next_logits().argmax())
