"""Fuzzing the lossless sampling core with extreme but legal settings and logits.

Any temperature the protocol accepts (including subnormal ones), any top-k and top-p, logits of any
finite float32 size with ties: the target distribution stays a distribution, the draft's sparse
proposal passes the verifier's checks, and a round always ends in a valid verdict.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from specd.shared.sampling import (
    SamplingParams,
    position_generator,
    sample_proposal,
    sparse_proposal,
    target_probs,
    validate_proposal,
    verify_round,
)
from tests import fuzz_strategies as fz

torch.set_num_threads(1)
VOCAB = 48

temperatures = st.one_of(st.just(0.0), st.sampled_from([5e-324, 1e-300, 1e-45, 1e-38, 1e-20, 1e-6, 100.0]),
                         st.floats(min_value=0.0, max_value=100.0))
params = st.builds(SamplingParams, temperature=temperatures,
                   top_k=st.one_of(st.integers(0, VOCAB + 2), st.just(2**62)),
                   top_p=st.one_of(st.sampled_from([1.0, 1e-300, 1e-6, 0.5]),
                                   st.floats(min_value=1e-9, max_value=1.0)))


@st.composite
def logits(draw, rows: int) -> torch.Tensor:
    scale = draw(st.sampled_from([0.0, 1e-30, 1.0, 30.0, 1e4, 1e30]))
    seed = draw(st.integers(0, 2**31))
    out = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):  # ties at the top
        out[:, :3] = out.max() + 1.0
    if draw(st.booleans()):  # some tokens masked out entirely
        out[:, VOCAB // 2:] = float("-inf")
    return out


def _is_distribution(p: torch.Tensor) -> bool:
    return bool(torch.isfinite(p).all()) and bool((p >= 0).all()) and bool(((p.sum(-1) - 1).abs() < 1e-4).all())


@fz.fuzz_settings(300)
@given(params, st.data())
def test_target_probs_is_always_a_distribution(sampling, data):
    p = target_probs(data.draw(logits(3)), sampling)
    assert _is_distribution(p), p


@fz.fuzz_settings(200)
@given(params.filter(lambda s: not s.greedy), st.integers(1, 6), st.integers(1, VOCAB), st.data())
def test_a_sampled_round_always_ends_in_a_valid_verdict(sampling, gamma, k, data):
    draft_logits, target_logits = data.draw(logits(gamma)), data.draw(logits(gamma + 1))
    proposal = sparse_proposal(draft_logits, sampling, k)
    drafts = sample_proposal(proposal, position_generator(3, 10, 1))
    q = validate_proposal(drafts, proposal, VOCAB)  # what the verifier checks on receipt
    assert _is_distribution(q)
    p = target_probs(target_logits, sampling)
    result = verify_round(drafts, proposal, p, position_generator(3, 10, 2))
    assert 0 <= result.accepted <= gamma and 0 <= result.token < VOCAB
    assert p[result.accepted, result.token] > 0 or result.accepted < gamma, "a bonus token has p > 0"


def test_a_tiny_temperature_tends_to_the_argmax_instead_of_nan():
    """Temperatures below float32's range used to overflow to NaN probabilities (and internal errors)."""
    row = torch.tensor([[2.0, 2.0, -1.0] + [0.0] * (VOCAB - 3)])
    for temperature in (1e-40, 1e-300, 5e-324):
        p = target_probs(row, SamplingParams(temperature=temperature))
        assert p[0, :3].tolist() == [0.5, 0.5, 0.0] and _is_distribution(p)
