"""The edge client's pure parts: adaptive γ, incremental detokenisation, local sampling, answer stats, pacing."""

from __future__ import annotations

import tomllib

import pytest

from specd.desktop.client.adaptive import GammaController, expected_tokens
from specd.desktop.client.answer import AnswerStats
from specd.desktop.client.cloud_local import local_step
from specd.desktop.client.detokenize import IncrementalDetokenizer
from specd.desktop.client.edge_client import client_pacer
from specd.desktop.drafters.torch_drafter import TorchDrafter
from specd.shared.config import dump_toml, load_config, to_dict
from specd.shared.protocol import RateLimiter
from specd.shared.sampling import SamplingParams
from tests.tiny_models import save_tiny_model


def feed(controller: GammaController, alpha_pattern, rounds: int, *, draft_ms=2.0, network_ms=20.0):
    """Rounds where each draft is accepted while the pattern says so."""
    import random

    rng = random.Random(0)
    for _ in range(rounds):
        gamma = controller.choose()
        accepted = 0
        while accepted < gamma and rng.random() < alpha_pattern:
            accepted += 1
        controller.observe_round(drafted=gamma, accepted=accepted, draft_ms=draft_ms * gamma,
                                 network_ms=network_ms, verify_ms=10.0 + 1.0 * (gamma + 1))
    return controller.choose()


def test_expected_tokens_matches_the_closed_form():
    assert expected_tokens(0.0, 5) == pytest.approx(1.0)
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5.0


def test_adaptive_gamma_grows_with_acceptance_and_shrinks_when_it_drops():
    controller = GammaController(gamma_max=12)
    high = feed(controller, 0.95, 60)
    low = feed(controller, 0.1, 60)
    assert high >= 6, high
    assert low <= 2, low
    assert high > low
    assert controller.alpha < 0.3


def test_slow_drafting_shortens_gamma():
    fast = feed(GammaController(gamma_max=12), 0.8, 60, draft_ms=0.5)
    slow = feed(GammaController(gamma_max=12), 0.8, 60, draft_ms=60.0)
    assert slow < fast


def test_fixed_gamma_is_kept_but_never_beyond_what_is_left():
    controller = GammaController(gamma_max=8, fixed=5)
    assert feed(controller, 0.1, 10) == 5
    assert controller.choose(remaining=3) == 2


def test_incremental_detokenizer_never_splits_a_character(smollm2_tokenizer):
    text = "Zürich 🌍 says: naïve café — 東京!"
    ids = smollm2_tokenizer.encode(text)
    detok = IncrementalDetokenizer(smollm2_tokenizer)
    pieces = [detok.push([i]) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_local_sampling_is_reproducible_for_a_seed(tmp_path):
    folder = save_tiny_model(tmp_path / "draft", seed=3)
    params = SamplingParams(temperature=1.0)

    def run(seed: int) -> list[int]:
        drafter = TorchDrafter(folder, "cpu")
        drafter.prefill([1, 5, 7])
        return [local_step(drafter, params, seed) for _ in range(12)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stats_per_position_and_json():
    stats = AnswerStats()
    stats.on_round_verdict(4, 2, verify_ms=10.0, network_ms=3.0)
    stats.on_round_verdict(2, 2, verify_ms=10.0, network_ms=None)
    stats.on_committed(6, "draft", now_ms=100.0, elapsed_s=0.1)
    stats.on_answer_end("speculative", 500.0)
    assert stats.target_forwards == 2 and stats.verify_ms == 20.0 and stats.network_ms == 3.0
    assert stats.drafted_by_position == [2, 2, 1, 1]
    assert stats.accepted_by_position == [2, 2, 0, 0]
    data = stats.to_json()
    assert data["acceptance_rate"] == pytest.approx(4 / 6)
    assert data["gamma_mean"] == 3.0
    assert data["tokens_per_second"] == pytest.approx(12.0)
    assert data["tokens_per_forward"] == 3.0


def test_dump_toml_round_trips_the_config():
    cfg = load_config(None, overrides={"models": {"target": 'C:\\models\\"quoted"'}, "limits": {"max_draft": 24}})
    text = dump_toml(to_dict(cfg))
    assert tomllib.loads(text) == to_dict(cfg)
    assert load_config(None, overrides=tomllib.loads(text)) == cfg


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_folder))


def test_bursty_acceptance_is_predicted_per_position():
    """Rounds that are either all accepted or rejected at once: per-position acceptance sees that a
    draft that survived the first position survives the rest, and predicts the tokens per round that
    such rounds really give, where the pooled i.i.d. formula does not."""
    controller = GammaController(gamma_max=8)
    for i in range(80):
        gamma = controller.choose()
        accepted = gamma if i % 2 else 0
        controller.observe_round(drafted=gamma, accepted=accepted, draft_ms=3.0 * gamma, network_ms=30.0,
                                 verify_ms=40.0 + 2.0 * (gamma + 1))
    h = controller.position_acceptance()
    assert h[0] < 0.7 and min(h[1:4]) > 0.8
    truth = 0.5 * 7 + 0.5 * 1  # half the rounds give all six drafts and the bonus, half one token
    assert abs(controller.expected_tokens(6) - truth) < 0.7
    assert abs(expected_tokens(controller.alpha, 6) - truth) > 1.0
    assert controller.choose() >= 5


def test_verify_cost_fit_shrinks_a_noisy_slope():
    controller = GammaController(gamma_max=8, fixed=1)
    for verify in (40.0, 60.0, 35.0, 58.0):  # one length only: the slope cannot be measured
        controller.observe_round(drafted=1, accepted=1, draft_ms=5.0, network_ms=1.0, verify_ms=verify)
    est = controller.estimate()
    assert est.verify_per_token_ms < 0.2 * (est.verify_fixed_ms + 2 * est.verify_per_token_ms)


def test_drafting_ahead_only_when_it_pays():
    good = GammaController(gamma_max=8)
    bad = GammaController(gamma_max=8)
    for _ in range(40):
        good.observe_round(drafted=4, accepted=4, draft_ms=20.0, network_ms=30.0, verify_ms=50.0)
        good.observe_guess(True)
        bad.observe_round(drafted=4, accepted=0, draft_ms=20.0, network_ms=30.0, verify_ms=50.0)
        bad.observe_guess(False)
    assert good.worth_drafting_ahead(4, 4)
    assert not bad.worth_drafting_ahead(4, 4)


def test_a_client_paced_by_the_limiter_is_never_refused_by_the_server():
    """A client that waits as ``RateLimiter.delay`` says, at 90 % of the rate with half the burst
    (the edge client's pacing), stays inside the server's limit however fast it would send."""
    rate = 50
    server, pacer = RateLimiter(rate), client_pacer(rate)
    now, sent = 0.0, []
    for _ in range(1000):  # wants to send every 0.1 ms: far above the limit
        now += pacer.delay(now)
        assert server.allow(now), f"refused after {len(sent)} messages at t={now:.3f} s"
        sent.append(now)
        now += 0.0001
    duration = sent[-1] - sent[0]
    assert 1000 / duration < rate and 1000 / duration > 0.85 * rate  # paced close to, but under, the limit
    unpaced = RateLimiter(rate)
    assert not all(unpaced.allow(0.0001 * i) for i in range(1000))  # the same burst without pacing is refused
