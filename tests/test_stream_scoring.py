"""While the verifier streams, the idle drafter scores the streamed tokens: min(1, q/p) is an unbiased
sample of the acceptance a round would get, measured without a round.

The estimator against the exact acceptance Σ min(p, q) (no randomness: the expectation is summed over the
vocabulary), the controller learning from it, the chooser leaving streaming as soon as scores say rounds
win (tests/chooser_sim.py), and the real client against a real verifier on 127.0.0.1: a draft that is the
target itself scores 1 on every streamed token, a different one less, and the answers stay the target's.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from specd.daemon.server import Verifier
from specd.desktop.bench.netem import DelayProxy
from specd.desktop.client.adaptive import GammaController
from specd.desktop.client.answer import Settings
from specd.desktop.client.stream_scoring import acceptance_sample
from specd.desktop.drafters.base import draft_proposal
from specd.shared.config import load_config
from specd.shared.sampling import SamplingParams, target_probs
from tests.chooser_sim import Costs, const
from tests.test_client_e2e import PROMPT, client_for, reference_greedy, verifier_config
from tests.test_mode_chooser import RECORD, share_of_the_faster_mode, simulation, streaming_only_ms
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9),
                                    SamplingParams(temperature=1.3, top_k=20)], ids=["t1", "t0.7-p0.9", "t1.3-k20"])
@pytest.mark.parametrize("support_k", [8, 64])
def test_the_score_of_a_token_the_target_sampled_is_on_average_the_drafts_acceptance(params, support_k):
    """E over x ~ p of min(1, q(x)/p(x)) = Σ min(p, q): the chance the lossless rule accepts a draft from q."""
    generator = torch.Generator().manual_seed(support_k)
    for _ in range(5):
        draft_logits = 3.0 * torch.randn(64, generator=generator)
        p = target_probs(draft_logits + 2.0 * torch.randn(64, generator=generator), params)
        proposal = draft_proposal(draft_logits.unsqueeze(0), params, support_k)
        q = torch.zeros(64).index_add_(0, proposal.ids[0], proposal.probs[0])
        acceptance = float(torch.minimum(p, q).sum())
        expected = sum(float(p[x]) * acceptance_sample(draft_logits, x, float(p[x]), params, support_k)
                       for x in range(64) if p[x] > 0)
        assert expected == pytest.approx(acceptance, abs=1e-5)


def test_a_greedy_score_is_whether_the_drafts_best_token_is_the_one_streamed():
    logits = torch.tensor([0.1, 2.0, 0.5])
    greedy = SamplingParams(temperature=0.0)
    assert acceptance_sample(logits, 1, 1.0, greedy, 8) == 1.0
    assert acceptance_sample(logits, 2, 1.0, greedy, 8) == 0.0


def test_scored_tokens_move_acceptance_as_a_quarter_round_each():
    """After a cold round rejected at its first draft, twenty scores of 0.9 bring α near 0.9 at every
    position; one score alone moves it no more than a round would."""
    controller = GammaController(8)
    controller.observe_round(drafted=3, accepted=0, draft_ms=30.0, network_ms=0.0, verify_ms=60.0, cold=True)
    after_round = controller.alpha
    controller.observe_streamed_acceptance(1.0)
    assert controller.alpha - after_round < 0.1
    for _ in range(19):
        controller.observe_streamed_acceptance(0.9)
    assert controller.alpha == pytest.approx(0.9, abs=0.06)
    assert all(h == pytest.approx(0.9, abs=0.08) for h in controller.position_acceptance())
    assert controller.streamed_scored == 20


@pytest.mark.parametrize("priors", [None, RECORD], ids=["built-in priors", "precision record"])
@pytest.mark.parametrize("rtt", [0.0, 20.0, 50.0, 100.0, 200.0])
def test_with_the_stream_scored_unlucky_first_rounds_cost_little(rtt, priors):
    """test_mode_chooser.py's CPU verifier stating its step, over eight seeds: a seed whose first rounds are
    rejected early streams, and without scores it streamed most of its first answer (up to 13 % behind the
    faster mode); the scores of the stream bring acceptance back within a few tokens. Every seed within 7 %
    of the faster mode, 2 % on average."""
    costs = Costs(rtt_ms=const(rtt), stated_step=True, stream_probs=True)
    ratios = [share_of_the_faster_mode(costs, rtt, priors, seed) for seed in range(8)]
    assert min(ratios) >= 0.93 and sum(ratios) / len(ratios) >= 0.98, ratios


@pytest.mark.parametrize("rtt", [200.0, 400.0])
def test_a_slow_draft_far_away_probes_seldom_when_the_stream_is_scored(rtt):
    """The torch draft on one core against a CPU verifier 200–400 ms away (the slow-draft case of
    test_mode_chooser.py): even a round accepted in full loses to streaming, so the drafter scores a token
    now and then (5 % of its time), and once the stream is scored probes come only at 2 % of the time: at
    most 3 in six answers (5–7 without scores), within 5 % of streaming alone on every seed and 3 % on
    average (without: up to 9 % and 5–7 %)."""
    ratios = []
    for seed in range(3):
        costs = Costs(rtt_ms=const(rtt), draft_ms=const(60.0), step_ms=const(67.0), verify_fixed_ms=const(60.0),
                      verify_per_token_ms=const(7.0), alpha=0.99, stated_step=True, stream_probs=True)
        chooser = simulation(costs, rtt=rtt, seed=seed, gamma_max=16)
        answers = [chooser.answer(64) for _ in range(6)]
        ratios.append(6 * streaming_only_ms(costs, rtt, 64) / sum(t.ms for t in answers))
        assert sum(t.rounds for t in answers) <= 3
        assert 0 < chooser.controller.streamed_scored < sum(t.streamed for t in answers) // 4, "a share of the time"
    assert min(ratios) >= 0.95 and sum(ratios) / len(ratios) >= 0.97, ratios


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"target": save_tiny_model(root / "target", seed=1), "draft": save_tiny_model(root / "draft", seed=2)}


async def _streamed_answers(folders, draft: str, sampling: SamplingParams) -> tuple[list, GammaController]:
    """Two answers of the product's chooser 150 ms from the verifier, where the tiny verifier's step beats
    any round, so they stream (and the drafter scores a token now and then: 5 % of its time)."""
    settings = replace(Settings.from_config(load_config(None)), sampling=sampling, max_new_tokens=40, seed=4)
    async with (Verifier(verifier_config(folders["target"])) as verifier,
                DelayProxy("127.0.0.1", verifier.port, rtt_ms=150) as proxy):
        client = client_for(proxy.url(), folders[draft])
        try:
            answers = [await client.generate(list(PROMPT), settings) for _ in range(2)]
        finally:
            await client.close()
    return answers, client._controller


async def test_a_draft_that_is_the_target_scores_one_on_every_streamed_token(folders):
    answers, controller = await _streamed_answers(folders, "target", SamplingParams(temperature=0.7, top_p=0.9))
    scored = sum(a.stats.streamed_scored for a in answers)
    assert scored >= len(answers) and controller.streamed_scored == scored  # each answer's first, at least
    assert all(a.stats.streamed_acceptance == pytest.approx(1.0, abs=1e-3) for a in answers if a.stats.streamed_scored)


async def test_a_different_draft_scores_less_and_the_greedy_answers_stay_the_targets(folders):
    answers, controller = await _streamed_answers(folders, "draft", SamplingParams(temperature=0.0))
    expected = reference_greedy(folders["target"], PROMPT, 40)
    assert all(a.token_ids == expected for a in answers)
    scored = [a.stats for a in answers if a.stats.streamed_scored]
    assert scored and all(0.0 <= s.streamed_acceptance < 1.0 for s in scored)
    assert controller.streamed_scored == sum(s.streamed_scored for s in scored)
