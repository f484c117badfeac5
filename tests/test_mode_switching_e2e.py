"""Answers that switch between speculative rounds and the verifier streaming alone, through the real edge
client and a real verifier on 127.0.0.1: both ways mid-answer, in one request (one prefill, the KV cache
kept), equal to the target's greedy decoding, reproducible for a seed, and the real chooser streaming
at a long round trip from the first answer on."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from specd.daemon.server import Verifier
from specd.desktop.bench.netem import DelayProxy
from specd.desktop.client.answer import Answer, Settings
from specd.shared.config import load_config
from specd.shared.sampling import SamplingParams
from tests.mode_switches import ScriptedSwitches, switching_answer
from tests.test_client_e2e import GREEDY, PROMPT, client_for, consistent, reference_greedy, verifier_config
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"target": save_tiny_model(root / "target", seed=1), "draft": save_tiny_model(root / "draft", seed=2)}


def _switches(answer: Answer) -> tuple[int, int]:
    """How often the answer went from rounds to streaming, and back."""
    kinds = ["cloud" if p.source == "cloud" else "round" for p in answer.pieces if p.token_ids]
    pairs = list(itertools.pairwise(kinds))
    return pairs.count(("round", "cloud")), pairs.count(("cloud", "round"))


async def test_greedy_answers_that_switch_both_ways_equal_the_target(folders):
    expected = reference_greedy(folders["target"], PROMPT, GREEDY.max_new_tokens)
    async with Verifier(verifier_config(folders["target"])) as verifier:
        client = client_for(verifier.url, folders["draft"])
        try:
            answers = [(await switching_answer(client, list(PROMPT), replace(GREEDY, seed=seed)))[0]
                       for seed in range(4)]
        finally:
            await client.close()
        assert verifier.metrics.requests["speculative"] == len(answers)
        # One prefill per answer, of the prompt only (the first; later ones reuse the shared prefix):
        # switching recomputed nothing.
        assert verifier.metrics.prefill_tokens == len(PROMPT) - 1
    for answer in answers:
        assert answer.token_ids == expected
        consistent(answer, client.tokenizer)
        stats = answer.stats
        assert stats.speculative_tokens + stats.cloud_tokens == stats.generated == len(expected)
    assert all(sum(getattr(a.stats, key) for a in answers) > 0
               for key in ("speculative_tokens", "cloud_tokens", "speculative_s", "cloud_s"))
    to_cloud, to_rounds = map(sum, zip(*(_switches(a) for a in answers), strict=True))
    assert to_cloud >= 4 and to_rounds >= 4, (to_cloud, to_rounds)


async def test_a_seeded_sampled_answer_that_switches_is_reproducible(folders):
    settings = Settings(sampling=SamplingParams(temperature=1.0), max_new_tokens=40, seed=5, gamma=3,
                        pipeline=False)
    # token for token needs every round verified whole (docs/protocol.md §5): no goodput budget
    async with Verifier(verifier_config(folders["target"], goodput_budget=False)) as verifier:
        client = client_for(verifier.url, folders["draft"])
        try:
            first = (await switching_answer(client, list(PROMPT), settings))[0]
            again = (await switching_answer(client, list(PROMPT), settings))[0]
            other = (await switching_answer(client, list(PROMPT), replace(settings, seed=6)))[0]
        finally:
            await client.close()
    assert first.token_ids == again.token_ids != other.token_ids
    assert first.stats.cloud_tokens and first.stats.speculative_tokens


async def test_the_chooser_streams_at_a_long_round_trip_and_remembers_it(folders):
    """At 150 ms the tiny verifier's step beats any round: the first answer probes (acceptance was never
    measured), then streams, probing again within 16 streamed tokens; the next answer streams from its first
    token (or a probe that fell due there), probing seldom (a round or two is not enough evidence to stop
    probing for good), and its trace says why."""
    settings = Settings.from_config(load_config(None))
    settings = replace(settings, sampling=SamplingParams(temperature=0.0), max_new_tokens=40)
    assert settings.mode_switching, "the product's default"
    async with (Verifier(verifier_config(folders["target"])) as verifier,
                DelayProxy("127.0.0.1", verifier.port, rtt_ms=150) as proxy):
        client = client_for(proxy.url(), folders["draft"])
        try:
            first = await client.generate(list(PROMPT), settings)
            second = await client.generate(list(PROMPT), settings)
        finally:
            await client.close()
    expected = reference_greedy(folders["target"], PROMPT, 40)
    assert first.token_ids == second.token_ids == expected
    # Probes only: each a round of at most γ_max drafts and its bonus; at most one per 16 streamed tokens.
    for answer, most in ((first, 3), (second, 2)):
        rounds = answer.stats.rounds
        assert rounds <= most
        assert answer.stats.cloud_tokens >= answer.stats.generated - (settings.gamma_max + 1) * rounds
    trace = second.stats.mode_switches
    assert trace[0]["to"] in ("streaming", "probe") and trace[0]["at_token"] == 0  # a probe may fall due there
    assert all(d["streaming_tok_s"] > d["speculative_tok_s"] > 0 for d in trace), "streaming decided each step"


def test_scripted_switches_depend_on_the_seed_only():
    a, b = ScriptedSwitches(3), ScriptedSwitches(3)
    assert [a.next_step(10) for _ in range(30)] == [b.next_step(10) for _ in range(30)]
    assert set(a.steps) == {"round", "stream", "probe"}
    c, d = ScriptedSwitches(3), ScriptedSwitches(4)
    assert [c.next_step(10) for _ in range(30)] != [d.next_step(10) for _ in range(30)]
