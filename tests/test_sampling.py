"""The core's pure functions: target transforms, sparse proposals, verification and its guards."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specd.shared.errors import ProposalError
from specd.shared.sampling import (
    DRAFT_STREAM,
    VERIFY_STREAM,
    ProposalDistribution,
    SamplingParams,
    position_generator,
    sample_proposal,
    sparse_proposal,
    target_probs,
    validate_proposal,
    verify_greedy,
    verify_round,
)


def _hf_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scores = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.3, top_k=7),
    SamplingParams(temperature=0.8, top_p=0.7),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.5),
])
def test_target_probs_match_transformers_sampling(params):
    logits = torch.randn(5, 100) * 3
    assert torch.allclose(target_probs(logits, params), _hf_probs(logits, params), atol=1e-6)


def test_greedy_target_is_one_hot_on_argmax():
    logits = torch.randn(3, 50)
    probs = target_probs(logits, SamplingParams(temperature=0.0))
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(probs.sum(-1), torch.ones(3))


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(temperature=math.inf), dict(top_k=-1),
                                 dict(top_p=0.0), dict(top_p=1.5), dict(temperature=math.nan)])
def test_impossible_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_sparse_proposal_is_top_k_renormalised_and_sampling_stays_in_support():
    logits = torch.randn(4, 300)
    proposal = sparse_proposal(logits, SamplingParams(temperature=0.9), support_k=16)
    assert proposal.ids.shape == (4, 16) and proposal.probs.dtype == torch.float32
    assert torch.allclose(proposal.probs.sum(-1), torch.ones(4), atol=1e-6)
    full = target_probs(logits, SamplingParams(temperature=0.9))
    expected = full.gather(-1, proposal.ids)
    assert torch.allclose(proposal.probs, expected / expected.sum(-1, keepdim=True), atol=1e-6)
    assert torch.equal(proposal.ids[:, 0], full.argmax(-1))
    tokens = sample_proposal(proposal, torch.Generator().manual_seed(3))
    assert all(int(t) in proposal.ids[i].tolist() for i, t in enumerate(tokens))


def _one_round(gamma=3, vocab=20, k=5):
    generator = torch.Generator().manual_seed(0)
    proposal = sparse_proposal(torch.randn(gamma, vocab), SamplingParams(1.0), k)
    drafts = sample_proposal(proposal, generator)
    p = target_probs(torch.randn(gamma + 1, vocab), SamplingParams(1.0))
    return drafts, proposal, p


def test_verify_round_is_reproducible_with_a_position_generator():
    drafts, proposal, p = _one_round()
    first = verify_round(drafts, proposal, p, position_generator(7, 100, VERIFY_STREAM))
    again = verify_round(drafts, proposal, p, position_generator(7, 100, VERIFY_STREAM))
    assert first == again
    assert 0 <= first.accepted <= 3 and first.bonus == (first.accepted == 3)


def test_all_drafts_accepted_when_p_equals_q_and_bonus_comes_from_last_position():
    vocab, gamma = 10, 3
    p = torch.full((gamma + 1, vocab), 0.0)
    p[:, 4] = 1.0
    p[gamma] = 0.0
    p[gamma, 7] = 1.0
    proposal = ProposalDistribution(ids=torch.tensor([[4]] * gamma), probs=torch.ones(gamma, 1))
    result = verify_round(torch.tensor([4, 4, 4]), proposal, p, torch.Generator().manual_seed(1))
    assert (result.accepted, result.token, result.bonus) == (3, 7, True)


def test_correction_comes_from_the_residual_not_from_p():
    # p puts mass on 0 and 1; q proposes only 0 with certainty. A rejected 0 must be corrected to 1,
    # the only token where p > q; sampling from p would sometimes give 0 again.
    p = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    proposal = ProposalDistribution(ids=torch.tensor([[0]]), probs=torch.tensor([[1.0]]))
    corrections = set()
    for seed in range(200):
        result = verify_round(torch.tensor([0]), proposal, p, torch.Generator().manual_seed(seed))
        if result.accepted == 0:
            corrections.add(result.token)
    assert corrections == {1}


def _proposal(ids, probs):
    return ProposalDistribution(ids=torch.tensor(ids), probs=torch.tensor(probs, dtype=torch.float32))


@pytest.mark.parametrize("drafts,ids,probs,match", [
    ([3], [[1, 2]], [[0.5, 0.5]], "outside its own proposal support"),
    ([1], [[1, 2]], [[1.0, 0.0]], None),
    ([2], [[1, 2]], [[1.0, 0.0]], "outside its own proposal support"),
    ([1], [[1, 2]], [[0.7, 0.7]], "sum to 1"),
    ([1], [[1, 2]], [[1.5, -0.5]], "non-negative"),
    ([1], [[1, 2]], [[math.nan, 1.0]], "finite"),
    ([1], [[1, 2]], [[math.inf, 0.0]], "finite"),
    ([1], [[1, 1]], [[0.5, 0.5]], "repeats"),
    ([1], [[1, 99]], [[0.5, 0.5]], "outside the vocabulary"),
    ([1, 2], [[1, 2]], [[0.5, 0.5]], "does not match"),
    ([-1], [[1, 2]], [[0.5, 0.5]], "outside the vocabulary"),
])
def test_invalid_proposals_raise_typed_errors(drafts, ids, probs, match):
    if match is None:
        validate_proposal(torch.tensor(drafts), _proposal(ids, probs), vocab_size=10)
        return
    with pytest.raises(ProposalError, match=match):
        validate_proposal(torch.tensor(drafts), _proposal(ids, probs), vocab_size=10)


def test_verify_round_refuses_mismatched_target_length():
    drafts, proposal, p = _one_round(gamma=3)
    with pytest.raises(ProposalError, match="need 4 target distributions"):
        verify_round(drafts, proposal, p[:3])


def test_verify_greedy_accepts_matching_prefix_then_takes_argmax():
    logits = torch.zeros(4, 8)
    for position, best in enumerate([5, 6, 1, 3]):
        logits[position, best] = 1.0
    full = verify_greedy(torch.tensor([5, 6, 1]), logits)
    assert (full.accepted, full.token, full.bonus) == (3, 3, True)
    partial = verify_greedy(torch.tensor([5, 0, 1]), logits)
    assert (partial.accepted, partial.token, partial.bonus) == (1, 6, False)


def test_position_generators_are_independent_streams():
    a = torch.rand(4, generator=position_generator(1, 10, DRAFT_STREAM))
    assert torch.equal(a, torch.rand(4, generator=position_generator(1, 10, DRAFT_STREAM)))
    for other in (position_generator(1, 11, DRAFT_STREAM), position_generator(2, 10, DRAFT_STREAM),
                  position_generator(1, 10, VERIFY_STREAM)):
        assert not torch.equal(a, torch.rand(4, generator=other))
