"""The one interface every draft backend implements (torch, onnxruntime-genai, openvino).

A drafter holds a token sequence and its own KV cache, and owns them: ``propose(prefix, γ, …)`` is
handed the committed ids, reconciles its cache with them by longest common prefix (as
:meth:`Drafter.prefill` does), and appends γ sampled drafts. The client keeps no copy of the drafter's
sequence; drafting ahead is ``propose(committed + drafts + [guess], …)``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specd.shared.errors import ModelError
from specd.shared.models import load_tokenizer_from
from specd.shared.protocol.codec import WireProposal, common_prefix
from specd.shared.sampling import (
    DRAFT_STREAM,
    ProposalDistribution,
    SamplingParams,
    encode_proposal,
    position_generator,
    sample_proposal,
    sparse_proposal,
)

log = logging.getLogger("specd.desktop")

BACKENDS = ("torch", "onnxruntime-genai", "openvino")

# Logits kept per position so a rollback to a length drafted from needs no forward pass (and gives the
# very numbers a fresh run computed: chunked and single-token passes round differently on int4 kernels).
_LOGITS_MEMO = 64


def draft_proposal(logits: torch.Tensor, params: SamplingParams, support_k: int) -> ProposalDistribution:
    """The draft's sparse proposal for one position ``[1, V]`` (the shared core's, whose top-p sorts
    only the head of the vocabulary, ~0.2 ms per token instead of ~3 ms for a full 49k sort)."""
    return sparse_proposal(logits, params, support_k)


@dataclass(frozen=True, slots=True)
class DraftProposal:
    """γ draft tokens and the sparse proposal each was sampled from (None when greedy)."""

    tokens: list[int]
    proposal: ProposalDistribution | None
    looked_ahead: int = 0  # drafts whose logits came from a forward that fed the caller's guess
    guessed: int = 0  # guessed tokens the forwards fed

    def wire(self) -> WireProposal | None:
        """The proposal as a ``draft`` message carries it."""
        return None if self.proposal is None else encode_proposal(self.proposal)


class Drafter(ABC):
    """A draft model with its own KV cache. Not thread-safe: one caller at a time."""

    #: backend id, one of :data:`BACKENDS`
    backend: str = ""
    #: the device it runs on, e.g. ``cpu``, ``cuda:0``, ``npu``
    device: str = "cpu"
    #: a human name for the model
    model_name: str = ""
    #: folder with the model's Hugging Face tokenizer files (what :meth:`load_tokenizer` reads)
    tokenizer_path: Path | None = None
    #: whether a forward can feed guessed tokens and give their logits too (see :meth:`propose`)
    feeds_ahead: bool = False
    #: the weight precision it was built at (int4, int8, fp16, fp32, prepared) and why (set by the loader)
    precision: str = ""
    precision_reason: str = ""

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
    def next_logits(self, ahead: Sequence[int] = ()) -> torch.Tensor:
        """float32 logits ``[V]`` for the token after the current sequence. ``ahead``: tokens guessed to come
        next, which a backend that can may feed in the same forward pass (see :meth:`propose`)."""

    def close(self) -> None:  # noqa: B027 - optional hook; most backends free memory on garbage collection
        """Release the model; the drafter is unusable afterwards."""

    def load_tokenizer(self) -> Any:
        """The draft model's Hugging Face tokenizer (its fingerprint must match the verifier's)."""
        if self.tokenizer_path is None:
            raise ModelError(f"the {self.backend} draft {self.model_name!r} has no tokenizer folder")
        return load_tokenizer_from(self.tokenizer_path)

    # -- shared behaviour ----------------------------------------------------------------------
    def prefill(self, token_ids: Sequence[int]) -> None:
        """Make the sequence exactly ``token_ids``, keeping the common prefix already cached."""
        current = self.tokens()
        keep = common_prefix(current, list(token_ids))
        if keep == len(token_ids) and keep == len(current):
            return
        self.rollback(keep)
        self.append(token_ids[keep:])

    def propose(self, prefix: Sequence[int], gamma: int, params: SamplingParams, support_k: int, seed: int,
                stop: Collection[int] = (), guess: Callable[[Sequence[int]], Sequence[int]] | None = None,
                ) -> DraftProposal:
        """Make the sequence ``prefix`` (keeping the common prefix cached), then sample γ drafts after it
        autoregressively, appending each; returns them with their proposals.

        Drafting ends early after a token in ``stop`` (end of sequence): nothing after it can count.

        The draw for the token at absolute position n uses ``position_generator(seed, n, DRAFT_STREAM)``,
        so the same prefix and seed give the same drafts however rounds are split.

        ``guess``: asked, with the drafts drawn so far, before each forward a draft needs, what is likely to
        follow them (the context lookup's continuation). Where the backend gives the logits of every token
        fed (:attr:`feeds_ahead`) the forward feeds the guess too, so while the drafts drawn equal it the
        next logits are already there and no forward runs. Each draft is still drawn from the model's own
        proposal with its own stream: the guess changes how many forwards run, never which token is drawn
        or from what (up to the rounding of a forward over several tokens).
        """
        self.prefill(prefix)
        tokens: list[int] = []
        ids: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        looked_ahead = guessed = 0
        for _ in range(gamma):
            looked_ahead += self.has_guessed_logits()
            ahead = guess(tokens) if guess is not None and self.feeds_ahead and not self.has_logits() else ()
            guessed += len(ahead)
            logits = self.next_logits(ahead).unsqueeze(0)
            if params.greedy:
                token = int(logits.argmax(dim=-1))
            else:
                proposal = draft_proposal(logits, params, support_k)
                generator = position_generator(seed, self.token_count, DRAFT_STREAM)
                token = int(sample_proposal(proposal, generator)[0])
                ids.append(proposal.ids[0])
                probs.append(proposal.probs[0])
            tokens.append(token)
            self.append([token])
            if token in stop:
                break
        if params.greedy:
            return DraftProposal(tokens=tokens, proposal=None, looked_ahead=looked_ahead, guessed=guessed)
        return DraftProposal(tokens=tokens, proposal=ProposalDistribution(ids=torch.stack(ids),
                                                                          probs=torch.stack(probs)),
                             looked_ahead=looked_ahead, guessed=guessed)

    def has_logits(self) -> bool:
        """Whether :meth:`next_logits` would answer without a forward pass."""
        return False

    def has_guessed_logits(self) -> bool:
        """Whether :meth:`next_logits` would answer without a forward pass, from one that fed a guess of the
        sequence's last token."""
        return False

    def most_likely_next(self) -> int:
        """The draft's guess for the verifier's next token (used when drafting ahead)."""
        return int(self.next_logits().argmax())


class CachedDrafter(Drafter):
    """A drafter over a KV cache that grows by forward passes and shrinks by truncation.

    Tokens are fed lazily: ``append`` only records them, and the next :meth:`next_logits` runs one
    forward pass over everything not yet in the cache (after a verdict usually just the verifier's
    token), and over the tokens guessed to come next where the backend gives the logits of every token
    it is fed (:attr:`feeds_ahead`): the cache may then hold guesses past the sequence, kept while the
    tokens appended equal them. Logits are remembered per cached length, so rolling back to a length the
    drafter already saw, or appending a guessed token, reuses them; otherwise the last kept token is run
    again. Backends implement :meth:`_forward` and :meth:`_truncate` (and :meth:`_forward_all` to feed ahead).
    """

    def __init__(self) -> None:
        self._tokens: list[int] = []
        self._in_cache: list[int] = []  # the tokens in the backend's cache: a prefix of the sequence, then guesses
        self._memo: dict[int, torch.Tensor] = {}  # cached length -> logits for the next token
        self._guessed: set[int] = set()  # the lengths in the memo whose last token was fed as a guess

    @abstractmethod
    def _forward(self, token_ids: list[int], start: int) -> torch.Tensor:
        """Run ``token_ids`` (at positions ``start``…) on top of the cache; float32 logits ``[V]`` of the last."""

    def _forward_all(self, token_ids: list[int], start: int) -> torch.Tensor:
        """Like :meth:`_forward`, but logits ``[len(token_ids), V]`` of every token fed."""
        raise NotImplementedError(f"the {self.backend} drafter does not feed guessed tokens ahead")

    @abstractmethod
    def _truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions of the cache."""

    @property
    def token_count(self) -> int:
        return len(self._tokens)

    def tokens(self) -> list[int]:
        return list(self._tokens)

    def append(self, token_ids: Sequence[int]) -> None:
        ids = [int(t) for t in token_ids]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the draft vocabulary [0, {self.vocab_size})")
        self._tokens.extend(ids)

    def rollback(self, length: int) -> None:
        if not 0 <= length <= len(self._tokens):
            raise ValueError(f"cannot roll back to {length}: the drafter holds {len(self._tokens)} tokens")
        if length == len(self._tokens):
            return  # nothing dropped: guesses cached past the sequence stay
        del self._tokens[length:]
        self._cut_cache(length)

    def _cut_cache(self, length: int) -> None:
        self._memo = {n: v for n, v in self._memo.items() if n <= length}
        if len(self._in_cache) > length:
            self._truncate(length)
            del self._in_cache[length:]

    def has_logits(self) -> bool:
        length = len(self._tokens)
        return length in self._memo and self._in_cache[:length] == self._tokens

    def has_guessed_logits(self) -> bool:
        return len(self._tokens) in self._guessed and self.has_logits()

    def next_logits(self, ahead: Sequence[int] = ()) -> torch.Tensor:
        length = len(self._tokens)
        if length == 0:
            raise ValueError("the drafter holds no tokens: prefill a prompt first")
        if self.has_logits():
            return self._memo[length]
        # Keep what the cache shares with the sequence, but at least the last token runs again (its logits
        # are not remembered, or the cache went past it with a guess that did not come true).
        start = min(common_prefix(self._in_cache, self._tokens), length - 1)
        self._cut_cache(start)
        fed = self._tokens[start:]
        guessed = [int(t) for t in ahead] if self.feeds_ahead else []
        if guessed:
            rows = self._forward_all(fed + guessed, start).to(torch.float32)
            if rows.shape[0] != len(fed) + len(guessed):  # a model built to output the last token's only
                log.warning("the %s draft %s gives the logits of the last token it is fed only: drafting "
                            "without the context lookup's guess", self.backend, self.model_name)
                self.feeds_ahead = False
                self._in_cache = self._tokens + guessed
                return self.next_logits()
            for i in range(len(fed) - 1, rows.shape[0]):
                self._memo[start + i + 1] = rows[i]
        else:
            self._memo[length] = self._forward(fed, start).to(torch.float32)
        self._guessed = {length + i + 1 for i in range(len(guessed))}
        self._in_cache = self._tokens + guessed
        while len(self._memo) > _LOGITS_MEMO:
            del self._memo[min(self._memo)]
        return self._memo[length]

    def reset(self) -> None:
        """Forget every token (a new conversation)."""
        self.rollback(0)
