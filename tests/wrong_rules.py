"""Wrong verification rules, the negative controls of the χ² tests: each has the signature of
:func:`specd.shared.sampling.verify_round` and breaks losslessness in one classic way. A χ² test that
does not reject them has no power."""

from __future__ import annotations

import torch

from specd.shared.sampling import ProposalDistribution, RoundResult, sample, validate_proposal, verify_round


def lower_only_p_of_d(draft_ids: torch.Tensor, proposal: ProposalDistribution, p: torch.Tensor,
                      generator: torch.Generator | None = None) -> RoundResult:
    """On rejection, only p(d) is lowered instead of taking ``norm(max(0, p − q))`` everywhere."""
    q = validate_proposal(draft_ids, proposal, p.shape[-1])
    for i, d in enumerate(draft_ids.tolist()):
        q_d = float(q[i][proposal.ids[i] == d].sum())
        if float(torch.rand(1, generator=generator)) < min(1.0, float(p[i, d]) / q_d):
            continue
        residual = p[i].clone()
        residual[d] = max(0.0, float(p[i, d]) - q_d)
        return RoundResult(accepted=i, token=sample(residual / residual.sum(), generator))
    return RoundResult(accepted=len(draft_ids), token=sample(p[-1], generator), bonus=True)


def correction_from_p(draft_ids: torch.Tensor, proposal: ProposalDistribution, p: torch.Tensor,
                      generator: torch.Generator | None = None) -> RoundResult:
    """On rejection the correction is sampled from p instead of the residual."""
    q = validate_proposal(draft_ids, proposal, p.shape[-1])
    for i, d in enumerate(draft_ids.tolist()):
        q_d = float(q[i][proposal.ids[i] == d].sum())
        if float(torch.rand(1, generator=generator)) < min(1.0, float(p[i, d]) / q_d):
            continue
        return RoundResult(accepted=i, token=sample(p[i], generator))
    return RoundResult(accepted=len(draft_ids), token=sample(p[-1], generator), bonus=True)


def bonus_from_the_last_drafts_row(draft_ids: torch.Tensor, proposal: ProposalDistribution, p: torch.Tensor,
                                   generator: torch.Generator | None = None) -> RoundResult:
    """The correct rule, except that the bonus token is drawn from ``p_γ`` (the last draft's position)
    instead of ``p_{γ+1}`` (the position after it)."""
    result = verify_round(draft_ids, proposal, p, generator)
    if not result.bonus:
        return result
    return RoundResult(accepted=result.accepted, token=sample(p[-2], generator), bonus=True)
