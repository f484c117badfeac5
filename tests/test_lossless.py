"""χ² proof that speculative sampling emits exactly the target's distribution, and that the test
has the power to catch a wrong rule."""

from __future__ import annotations

import pytest
import torch

from specd.shared.sampling import ProposalDistribution, RoundResult, SamplingParams, sample, validate_proposal
from tests.speculative_sim import (
    chi_square_pvalue,
    counts,
    exact_first_two,
    exact_third,
    pair_counts,
    speculative_first_tokens,
)

PROMPT = [1, 17, 42, 9]
SAMPLES = 20_000
ALPHA = 0.01
VOCAB = 64

CONFIGS = {
    "temperature-1": dict(params=SamplingParams(temperature=1.0), gamma=4, support_k=VOCAB),
    "temperature-0.7": dict(params=SamplingParams(temperature=0.7), gamma=4, support_k=VOCAB),
    "top-k": dict(params=SamplingParams(temperature=1.0, top_k=10), gamma=4, support_k=VOCAB),
    "top-p": dict(params=SamplingParams(temperature=1.0, top_p=0.8), gamma=4, support_k=VOCAB),
    "gamma-1": dict(params=SamplingParams(temperature=1.0), gamma=1, support_k=VOCAB),
    "gamma-8": dict(params=SamplingParams(temperature=1.0), gamma=8, support_k=VOCAB),
    "support-8": dict(params=SamplingParams(temperature=1.0), gamma=4, support_k=8),
    "all-filters-support-4": dict(params=SamplingParams(temperature=0.7, top_k=20, top_p=0.9), gamma=3,
                                  support_k=4),
}


@pytest.fixture(scope="module")
def exact(tiny_target):
    cache: dict[SamplingParams, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        if params not in cache:
            joint = exact_first_two(tiny_target, PROMPT, params)
            cache[params] = joint, exact_third(tiny_target, PROMPT, params, joint)
        return cache[params]

    return get


def _pvalues(tiny_target, tiny_draft, exact, *, params, gamma, support_k, seed=1234, verify=None):
    kwargs = {} if verify is None else {"verify": verify}
    tokens = speculative_first_tokens(tiny_target, tiny_draft, PROMPT, k=3, gamma=gamma, params=params,
                                      support_k=support_k, samples=SAMPLES, seed=seed, **kwargs)
    joint, third = exact(params)
    p_pair = chi_square_pvalue(pair_counts(tokens[:, 0], tokens[:, 1], VOCAB), joint)
    p_third = chi_square_pvalue(counts(tokens[:, 2], VOCAB), third)
    return p_pair, p_third


def test_draft_and_target_really_differ(tiny_target, tiny_draft):
    """The tests below only mean something if q ≠ p, so rejections and corrections happen."""
    with torch.no_grad():
        x = torch.tensor([PROMPT])
        p = tiny_target(x).logits[0, -1].softmax(-1)
        q = tiny_draft(x).logits[0, -1].softmax(-1)
    overlap = float(torch.minimum(p, q).sum())
    assert 0.2 < overlap < 0.9


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_speculative_sampling_matches_target(name, tiny_target, tiny_draft, exact):
    p_pair, p_third = _pvalues(tiny_target, tiny_draft, exact, **CONFIGS[name])
    assert p_pair > ALPHA, f"{name}: first two tokens differ from the target's (p={p_pair:.2e})"
    assert p_third > ALPHA, f"{name}: third token differs from the target's (p={p_third:.2e})"


def _lower_only_p_of_d(draft_ids, proposal: ProposalDistribution, p, generator) -> RoundResult:
    """The seed's bug: on rejection, only p(d) is lowered instead of taking max(0, p − q) everywhere."""
    q = validate_proposal(draft_ids, proposal, p.shape[-1])
    for i, d in enumerate(draft_ids.tolist()):
        q_d = float(q[i][proposal.ids[i] == d].sum())
        if float(torch.rand(1, generator=generator)) < min(1.0, float(p[i, d]) / q_d):
            continue
        residual = p[i].clone()
        residual[d] = max(0.0, float(p[i, d]) - q_d)
        return RoundResult(accepted=i, token=sample(residual / residual.sum(), generator))
    return RoundResult(accepted=len(draft_ids), token=sample(p[-1], generator), bonus=True)


def _correction_from_p(draft_ids, proposal: ProposalDistribution, p, generator) -> RoundResult:
    """Another wrong rule: on rejection sample the correction from p instead of the residual."""
    q = validate_proposal(draft_ids, proposal, p.shape[-1])
    for i, d in enumerate(draft_ids.tolist()):
        q_d = float(q[i][proposal.ids[i] == d].sum())
        if float(torch.rand(1, generator=generator)) < min(1.0, float(p[i, d]) / q_d):
            continue
        return RoundResult(accepted=i, token=sample(p[i], generator))
    return RoundResult(accepted=len(draft_ids), token=sample(p[-1], generator), bonus=True)


@pytest.mark.slow
@pytest.mark.parametrize("wrong_rule", [_lower_only_p_of_d, _correction_from_p])
def test_the_chi_square_test_catches_a_wrong_rule(wrong_rule, tiny_target, tiny_draft, exact):
    p_pair, p_third = _pvalues(tiny_target, tiny_draft, exact, params=SamplingParams(temperature=1.0),
                               gamma=4, support_k=VOCAB, verify=wrong_rule)
    assert min(p_pair, p_third) < 1e-6, "the χ² test failed to detect a wrong verification rule"
