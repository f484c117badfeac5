"""The lossless speculative-sampling core (Leviathan et al. 2023, Alg. 1).

Pure, vectorised float32 torch functions with no I/O. Names follow the paper: ``p`` is always the
target's distribution and ``q`` always the draft's proposal. docs/protocol.md §4 states the rule these
functions implement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from specd.shared.errors import ProposalError
from specd.shared.protocol.codec import Q_IDS_DTYPE, Q_PROBS_DTYPE, WireProposal

# Proposal probabilities must sum to 1 within this tolerance before the verifier normalises them.
PROPOSAL_SUM_TOLERANCE = 1e-3

# Independent random streams, keyed by (seed, absolute position, stream): the draws for a position do
# not depend on how earlier tokens were split into rounds, on discarded rounds or on reconnections.
DRAFT_STREAM = 1
VERIFY_STREAM = 2
CLOUD_STREAM = 3
LOCAL_STREAM = 4  # the edge generating alone while the verifier is unreachable
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """The user's sampling settings: they define the distribution the output must follow.

    ``temperature == 0`` means greedy. ``top_k == 0`` and ``top_p == 1.0`` disable those filters.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def of(cls, settings: Any) -> SamplingParams:
        """From anything holding the three settings: ``[sampling]`` of the config, a wire ``Sampling``."""
        return cls(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)


@dataclass(frozen=True, slots=True)
class ProposalDistribution:
    """The draft's sparse proposal q for γ positions: ``ids[i, j]`` has probability ``probs[i, j]``.

    Outside a row's support q is 0. Shapes are ``[γ, K]``; ids are int64, probs float32.
    """

    ids: torch.Tensor
    probs: torch.Tensor

    @property
    def support_size(self) -> int:
        return int(self.ids.shape[-1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True, slots=True)
class RoundResult:
    """Outcome of verifying one round: ``accepted`` drafts, then ``token`` (correction or bonus)."""

    accepted: int
    token: int
    bonus: bool = False


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_generator(seed: int, position: int, stream: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for the random draws at ``position`` of a request seeded with ``seed``.

    Drafts use ``DRAFT_STREAM`` (position of the drafted token), the verifier ``VERIFY_STREAM``
    (position of the round's first draft) and cloud-only generation ``CLOUD_STREAM``.
    """
    key = _splitmix64(_splitmix64(seed & _MASK64) ^ ((position & _MASK64) * 0x2545F4914F6CDD1D & _MASK64) ^ stream)
    generator = torch.Generator(device=device)
    generator.manual_seed(key & ((1 << 63) - 1))
    return generator


def _filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p — the order Hugging Face's logits warpers use."""
    logits = logits.to(torch.float32)
    # Shift by the max first (softmax is shift-invariant) and keep the divisor a normal float32: a tiny
    # temperature then gives -inf and 0, never inf - inf or 0 / 0 = NaN, and tends to the argmax as it
    # should (temperature 1e-40 used to give NaN probabilities).
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        scaled = _top_p(scaled, params.top_p)
    return scaled


def _top_p(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their mass reaches ``top_p`` (the token that crosses it stays).

    A token stays when the mass of the tokens more likely than it is below ``top_p``. That set is a
    prefix in descending order, so only the head needs sorting: ``topk`` of a growing head until it
    holds ``top_p`` of the mass — a few hundred of a 49k vocabulary instead of a full sort (~5 ms/row).
    """
    vocab = scaled.shape[-1]
    log_total = torch.logsumexp(scaled, dim=-1, keepdim=True)
    head = min(vocab, 256)
    while True:
        values, ids = torch.topk(scaled, head, dim=-1)
        probs = (values - log_total).exp()
        if head == vocab or bool((probs.sum(dim=-1) >= top_p).all()):
            break
        head = min(vocab, head * 8)
    more_likely = probs.cumsum(dim=-1) - probs
    keep = more_likely < top_p
    keep[..., 0] = True  # the most likely token always stays
    kept = torch.full_like(scaled, float("-inf"))
    return kept.scatter(-1, ids, values.masked_fill(~keep, float("-inf")))


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn logits ``[..., V]`` into the distribution the output must follow, in float32.

    Greedy settings give a one-hot distribution on the argmax.
    """
    if params.greedy:
        probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        return probs.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return _filter_logits(logits, params).softmax(dim=-1)


def sparse_proposal(
    logits: torch.Tensor, params: SamplingParams, support_k: int
) -> ProposalDistribution:
    """The draft's proposal for logits ``[γ, V]``: the ``support_k`` most likely tokens, renormalised.

    The draft must sample from exactly this distribution (see :func:`sample_proposal`) and send it;
    the verifier then stays lossless whatever the truncation did to q.
    """
    if support_k < 1:
        raise ValueError(f"support_k must be >= 1, got {support_k}")
    probs = target_probs(logits, params)
    k = min(support_k, probs.shape[-1])
    top_probs, top_ids = torch.topk(probs, k, dim=-1)
    top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return ProposalDistribution(ids=top_ids.to(torch.int64), probs=top_probs.to(torch.float32))


def sample_proposal(
    proposal: ProposalDistribution, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sample one token per row of ``proposal``; returns int64 ids ``[γ]``."""
    choice = torch.multinomial(proposal.probs, 1, generator=generator)
    return proposal.ids.gather(-1, choice).squeeze(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """Sample one token id from a full distribution ``[V]``."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def validate_proposal(
    draft_ids: torch.Tensor, proposal: ProposalDistribution, vocab_size: int
) -> torch.Tensor:
    """Check a received proposal and return q normalised by its row sums (float32 ``[γ, K]``).

    Raises :class:`ProposalError` for anything that would otherwise give a wrong answer.
    """
    ids, probs = proposal.ids, proposal.probs
    gamma = draft_ids.shape[0]
    if ids.dim() != 2 or probs.shape != ids.shape or ids.shape[0] != gamma:
        raise ProposalError(
            f"proposal shape {tuple(ids.shape)}/{tuple(probs.shape)} does not match {gamma} drafts"
        )
    if ids.shape[1] < 1:
        raise ProposalError("proposal support is empty")
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise ProposalError(f"proposal token id outside the vocabulary [0, {vocab_size})")
    if bool(((draft_ids < 0) | (draft_ids >= vocab_size)).any()):
        raise ProposalError(f"draft token id outside the vocabulary [0, {vocab_size})")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        raise ProposalError("proposal probabilities must be finite and non-negative")
    sums = probs.sum(dim=-1, dtype=torch.float64)
    if bool(((sums - 1.0).abs() > PROPOSAL_SUM_TOLERANCE).any()):
        raise ProposalError(
            f"proposal probabilities must sum to 1 (±{PROPOSAL_SUM_TOLERANCE}); got {sums.tolist()}"
        )
    sorted_ids = ids.sort(dim=-1).values
    if bool((sorted_ids[:, 1:] == sorted_ids[:, :-1]).any()):
        raise ProposalError("proposal support repeats a token id")
    q = probs.to(torch.float32) / probs.sum(dim=-1, keepdim=True).to(torch.float32)
    q_at_draft = (q * (ids == draft_ids.unsqueeze(-1))).sum(dim=-1)
    if bool((q_at_draft <= 0).any()):
        position = int((q_at_draft <= 0).nonzero()[0, 0])
        raise ProposalError(f"draft {position} is outside its own proposal support (q(d) = 0)")
    return q


def verify_round(
    draft_ids: torch.Tensor,
    proposal: ProposalDistribution,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> RoundResult:
    """Check ``proposal`` (:func:`validate_proposal`) and verify it (:func:`verify_validated`)."""
    q = validate_proposal(draft_ids, proposal, p.shape[-1])
    return verify_validated(draft_ids, proposal.ids, q, p, generator)


def verify_validated(
    draft_ids: torch.Tensor,  # [γ] int64
    ids: torch.Tensor,  # [γ, K] int64, the proposal's support
    q: torch.Tensor,  # [γ, K] float32, what validate_proposal returned for it
    p: torch.Tensor,  # [γ+1, V] float32, already transformed
    generator: torch.Generator | None = None,
) -> RoundResult:
    """Verify γ drafts against target distributions ``p`` (the verifier checked the proposal once).

    Accept draft i when ``u < p_i(d_i) / q_i(d_i)``; at the first rejection sample the correction from
    ``norm(max(0, p_i − q_i))`` over the whole vocabulary; when all are accepted sample the bonus token
    from ``p_{γ+1}``.
    """
    gamma = int(draft_ids.shape[0])
    if p.dim() != 2 or p.shape[0] != gamma + 1:
        raise ProposalError(f"need {gamma + 1} target distributions for {gamma} drafts, got {p.shape[0]}")
    q_at_draft = (q * (ids == draft_ids.unsqueeze(-1))).sum(dim=-1)
    p_at_draft = p[:gamma].gather(-1, draft_ids.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(gamma, generator=generator, dtype=torch.float32, device=p.device)
    rejected = (u * q_at_draft >= p_at_draft).nonzero()
    if rejected.numel() == 0:
        return RoundResult(accepted=gamma, token=sample(p[gamma], generator), bonus=True)
    i = int(rejected[0, 0])
    residual = p[i].clone().scatter_add_(0, ids[i], -q[i]).clamp_(min=0.0)
    if float(residual.sum()) <= 1e-12:
        residual = p[i]  # p <= q everywhere: the residual is empty, p itself is the answer
    return RoundResult(accepted=i, token=sample(residual, generator))


def verify_greedy(draft_ids: torch.Tensor, target_logits: torch.Tensor) -> RoundResult:
    """Greedy verification: accept while a draft equals the target's argmax; then take the argmax."""
    gamma = int(draft_ids.shape[0])
    if target_logits.shape[0] != gamma + 1:
        raise ProposalError(
            f"need {gamma + 1} target positions for {gamma} drafts, got {target_logits.shape[0]}"
        )
    best = target_logits.argmax(dim=-1)
    mismatch = (best[:gamma] != draft_ids).nonzero()
    accepted = gamma if mismatch.numel() == 0 else int(mismatch[0, 0])
    return RoundResult(accepted=accepted, token=int(best[accepted]), bonus=accepted == gamma)


def encode_proposal(proposal: ProposalDistribution) -> WireProposal:
    """The bytes a ``draft`` message carries for ``proposal`` (layout in ``shared/protocol/codec.py``)."""
    ids = proposal.ids.to(torch.int32).contiguous().cpu().numpy().astype(Q_IDS_DTYPE, copy=False)
    probs = proposal.probs.to(torch.float32).contiguous().cpu().numpy().astype(Q_PROBS_DTYPE, copy=False)
    return WireProposal(proposal.support_size, ids.tobytes(), probs.tobytes())


def decode_proposal(q_ids: bytes, q_probs: bytes, gamma: int, support: int) -> ProposalDistribution:
    """The proposal a ``draft`` carried, unchecked (the session checked only the byte sizes)."""
    ids = torch.frombuffer(bytearray(q_ids), dtype=torch.int32).reshape(gamma, support)
    probs = torch.frombuffer(bytearray(q_probs), dtype=torch.float32).reshape(gamma, support)
    return ProposalDistribution(ids=ids.to(torch.int64), probs=probs.clone())
