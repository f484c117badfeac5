"""The context proposer: the suffix automaton's lookups against a brute-force search, the rounds it
builds (a one-token support the verifier takes as it is), the planner's choice between sources, and
greedy answers through a real verifier equal to the target's own with looked-up drafts in them."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from specd.daemon.server import Verifier
from specd.desktop.client.adaptive import GammaController
from specd.desktop.client.context_lookup import ContextLookup
from specd.desktop.client.lookahead import LookupGuesses
from specd.desktop.client.round_planner import RoundPlanner, SourceAcceptance
from specd.desktop.client.rounds import with_lookup
from specd.desktop.client.stats_line import stats_line
from specd.desktop.drafters.base import DraftProposal
from specd.shared.config import Config
from specd.shared.sampling import ProposalDistribution, SamplingParams, sparse_proposal, validate_proposal, verify_round
from tests.test_client_e2e import GREEDY, client_for, reference_greedy, verifier_config
from tests.tiny_models import save_tiny_model


def brute_continuation(tokens: list[int], extra: list[int], limit: int, min_match: int) -> list[int]:
    """The longest suffix of ``tokens + extra`` that ends earlier in ``tokens`` (first such place), by search."""
    sequence, last = tokens + extra, len(tokens) - 1
    best, best_end = 0, -1
    for length in range(1, len(sequence) + 1):
        suffix = sequence[-length:]
        ends = [e for e in range(length - 1, last) if tokens[e - length + 1:e + 1] == suffix]
        if ends:
            best, best_end = length, min(ends)
    return tokens[best_end + 1:best_end + 1 + limit] if best >= min_match else []


def test_lookup_finds_the_longest_earlier_match_like_a_search():
    rng = random.Random(5)
    for _ in range(1500):
        vocab = rng.choice([2, 3, 6])
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        lookup = ContextLookup(min_match=rng.choice([1, 2, 3]))
        lookup.sync(tokens[: rng.randint(0, len(tokens))])  # indexed in two steps, as rounds commit tokens
        lookup.sync(tokens)
        extra = [rng.randrange(vocab) for _ in range(rng.randint(0, 3))]
        limit = rng.randint(1, 6)
        assert lookup.continuation(extra, limit) == brute_continuation(tokens, extra, limit, lookup.min_match), \
            (tokens, extra, limit)


def test_lookup_reconciles_with_the_committed_ids():
    lookup = ContextLookup()
    lookup.sync([5, 6, 7, 8, 5, 6])
    assert lookup.continuation((), 3) == [7, 8, 5]
    lookup.sync([5, 6, 7, 8, 5, 6, 7])  # extends: appended
    assert lookup.indexed == 7 and lookup.continuation((), 2) == [8, 5]
    lookup.sync([9, 9, 1, 2, 9, 9])  # another conversation: indexed afresh
    assert lookup.indexed == 6 and lookup.continuation((), 4) == [1, 2, 9, 9]
    assert lookup.continuation((1,), 4) == [2, 9, 9]  # drafts in flight continue the match
    assert ContextLookup().continuation((), 4) == []
    short = ContextLookup()
    short.sync([3, 4, 3])
    assert short.continuation((), 4) == []  # a one-token match is chance


def test_a_looked_up_round_is_a_one_token_support_the_verifier_accepts_as_it_is():
    vocab = 50
    logits = torch.randn(2, vocab)
    model = sparse_proposal(logits, SamplingParams(temperature=1.0), 8)
    model_tokens = [int(model.ids[0, 0]), int(model.ids[1, 0])]
    mixed = with_lookup([3, 0], DraftProposal(model_tokens, model), greedy=False)
    assert mixed.tokens == [3, 0, *model_tokens] and mixed.proposal.ids.shape == (4, 8)
    q = validate_proposal(torch.tensor(mixed.tokens), mixed.proposal, vocab)  # what the verifier checks
    assert q[0, 0] == 1.0 and q[1, 0] == 1.0 and q[:2, 1:].sum() == 0.0
    alone = with_lookup([7, 7, 9], None, greedy=False)
    assert alone.proposal.ids.tolist() == [[7], [7], [9]] and alone.proposal.probs.tolist() == [[1.0]] * 3
    validate_proposal(torch.tensor(alone.tokens), alone.proposal, vocab)
    assert with_lookup([7], None, greedy=True) == DraftProposal([7], None)


def test_the_rule_takes_a_one_token_support_lossless():
    """With q = 1 on the looked-up token, the rule keeps it with probability p(token) and otherwise samples p
    without it: the output follows p exactly (no second rule for the lookup)."""
    p = torch.tensor([0.5, 0.3, 0.2])
    proposal = ProposalDistribution(ids=torch.tensor([[1]]), probs=torch.tensor([[1.0]]))
    counts = torch.zeros(3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20000):
        result = verify_round(torch.tensor([1]), proposal, p.repeat(2, 1), generator)
        counts[1 if result.accepted else result.token] += 1
    assert torch.allclose(counts / counts.sum(), p, atol=0.015)


def planner(alpha_context: float, draft_ms: float) -> RoundPlanner:
    controller = GammaController(8)
    for _ in range(20):
        controller.observe_round(drafted=4, accepted=2, draft_ms=4 * draft_ms, network_ms=20.0, verify_ms=30.0)
    acceptance = SourceAcceptance()
    for matched in (2, 4, 8):  # every match length: looked-up rounds accepted in full, or not at all
        for _ in range(30):
            acceptance.observe(drafted=8, accepted=8 if alpha_context > 0.5 else 0, matched=matched)
    return RoundPlanner(controller, ContextLookup(), acceptance)


def test_the_planner_chooses_the_source_by_expected_tokens_per_second():
    copy = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3]
    plan = planner(0.9, draft_ms=30.0).plan(copy, remaining=40, max_gamma=16, stop=frozenset())
    assert plan.lookup == (4, 5, 6, 7, 8, 9, 10, 11) and plan.model_gamma == 0  # good lookups, slow model
    ending = [1, 2, 3, 4, 1, 2]
    plan = planner(0.9, draft_ms=2.0).plan(ending, remaining=40, max_gamma=16, stop=frozenset())
    assert plan.lookup == (3, 4, 1, 2) and plan.model_gamma > 0  # the lookup runs out: the model continues
    plan = planner(0.05, draft_ms=2.0).plan(copy, remaining=40, max_gamma=16, stop=frozenset())
    assert plan.lookup == () and plan.model_gamma > 0  # lookups that are never accepted are not sent
    plan = planner(0.9, draft_ms=30.0).plan(copy, remaining=40, max_gamma=16, stop=frozenset({6}))
    assert plan.lookup == (4, 5, 6) and plan.model_gamma == 0  # nothing is drafted past a stop token
    off = RoundPlanner(planner(0.9, 30.0).controller, None)
    assert off.plan(copy, 40, 16, frozenset()).lookup == ()


def test_the_models_guess_is_looked_up_after_the_drafts_it_drew_so_far():
    """Asked before each forward, the guess continues the committed tokens, what the round assumes and the
    drafts so far; it covers only drafts whose logits a later draft reads, and only while it is likely."""
    copy = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2]
    guesses = LookupGuesses(planner(0.9, draft_ms=2.0).acceptance)
    guess = guesses.for_round(copy, [3], gamma=6)  # the round assumes 3 first (a looked-up draft, a bonus guess)
    assert guess([]) == [4, 5, 6, 7, 8]  # drafts 1-5; the sixth's logits are never read
    assert guess([4, 5]) == [6, 7, 8]
    assert guess([4, 9]) == []  # the draft left the copy, and one token is no match
    assert guess([4, 9, 10]) == [11, 1]  # ... but two are: the copy goes on from there
    assert guess([4, 9, 10, 11, 1]) == []  # no room left
    assert guess([4, 5, 99]) == []  # nothing matches
    unlikely = LookupGuesses(planner(0.05, draft_ms=2.0).acceptance).for_round(copy, [3], gamma=6)
    assert unlikely([]) == []  # a guess that rarely comes true costs a wider forward for nothing


def test_a_round_in_flight_is_followed_by_one_looked_up_ahead():
    copy = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3]
    good = planner(0.9, draft_ms=30.0)
    ahead = good.look_ahead(copy, [4, 5, 6], 3, 3, room=20, max_gamma=4, stop=frozenset())
    assert ahead == (7, [8, 9, 10, 11], 6)  # the match grew by the drafts in flight
    assert good.look_ahead(copy, [4, 5, 6], 3, 3, room=20, max_gamma=4, stop=frozenset({9})) == (7, [8, 9], 6)
    # the model's drafts in flight: sent ahead only when they are likely to be accepted too
    assert good.look_ahead(copy, [4, 5, 6], 0, 0, room=20, max_gamma=4, stop=frozenset()) is None  # h ≈ 0.5
    for _ in range(30):
        good.controller.observe_round(drafted=4, accepted=4, draft_ms=120.0, network_ms=20.0, verify_ms=30.0)
    assert good.look_ahead(copy, [4, 5, 6], 0, 0, room=20, max_gamma=4, stop=frozenset()) == ahead
    assert good.look_ahead(copy, [4, 5, 6], 3, 3, room=0, max_gamma=4, stop=frozenset()) is None
    assert good.look_ahead(copy, [4, 5, 6], 3, 3, room=20, max_gamma=4, stop=frozenset({5})) is None  # it ends
    assert planner(0.2, draft_ms=30.0).look_ahead(copy, [4, 5, 6], 3, 3, 20, 4, frozenset()) is None  # rarely used


def test_the_round_drafted_ahead_is_offered_the_lookups_guess_and_round():
    copy = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3]
    good = planner(0.9, draft_ms=30.0)
    ahead = good.plan_ahead(copy, [4, 5, 6], room=20, max_gamma=4, stop=frozenset())
    assert ahead.guess == 7 and ahead.plan.lookup == (8, 9, 10, 11) and ahead.plan.matched == 7
    assert ahead.trusted  # its copies come true more often than the drafter's guesses (the prior's)
    assert good.plan_ahead(copy, [4, 5, 6], room=20, max_gamma=4, stop=frozenset({7})) is None  # the guess ends it
    assert good.plan_ahead(copy, [4, 5, 6], room=20, max_gamma=4, stop=frozenset({9})).plan.lookup == (8, 9)
    assert good.plan_ahead(copy, [9, 9], room=20, max_gamma=4, stop=frozenset()) is None  # no match
    assert RoundPlanner(good.controller, None).plan_ahead(copy, [4, 5, 6], 20, 4, frozenset()) is None
    for _ in range(30):
        good.acceptance.observe(drafted=4, accepted=0, matched=7)
    worse = good.plan_ahead(copy, [4, 5, 6], room=20, max_gamma=4, stop=frozenset())
    assert not worse.trusted and worse.plan.lookup == () and worse.plan.model_gamma >= 1  # the model drafts it


def test_lookup_acceptance_is_measured_per_source_and_match_length():
    acceptance = SourceAcceptance()
    assert acceptance.first(2) < acceptance.first(4) < acceptance.first(8)  # a long match: more likely a copy
    for _ in range(30):
        acceptance.observe(drafted=5, accepted=5, matched=8)
        acceptance.observe(drafted=5, accepted=0, matched=2)
    assert acceptance.first(9) > 0.95 and acceptance.next(9) > 0.95
    assert acceptance.first(3) < 0.05
    accepted, all_accepted = acceptance.expected_accepted(4, matched=8)
    assert 3.5 < accepted < 4.0 and all_accepted > 0.85
    for _ in range(30):
        acceptance.observe(drafted=5, accepted=1, matched=8)  # the first is right, the copy stops there
    assert acceptance.first(8) > 0.95 and acceptance.next(8) < 0.05


def test_lookups_are_measured_from_rounds_the_model_drafted_too():
    """A looked-up token equals the committed one as often as the rule would accept it, so the rounds the
    model drafts measure the lookup as well: it is learnt without being tried."""
    copying = RoundPlanner(GammaController(8), ContextLookup())
    before = copying.acceptance.first(8)
    for _ in range(20):
        copying.observe(0, 3, matched=8, found=(5, 6, 7, 8), committed=[5, 6, 7, 8, 9])
    assert copying.acceptance.first(8) > 0.95 > before and copying.acceptance.next(8) > 0.95
    chatting = RoundPlanner(GammaController(8), ContextLookup())
    for _ in range(20):
        chatting.observe(0, 3, matched=2, found=(5, 6, 7, 8), committed=[4, 6, 7, 8])
    assert chatting.acceptance.first(2) < 0.05
    used = RoundPlanner(GammaController(8), ContextLookup())
    for _ in range(20):
        used.observe(4, 1, matched=8, found=(5, 6, 7, 8), committed=[5, 9])  # looked up: the verdict counts
    assert used.acceptance.first(8) > 0.95 and used.acceptance.next(8) < 0.05


def test_the_config_turns_the_context_proposer_on_by_default():
    from specd.desktop.client.answer import Settings
    from specd.shared.config import load_config

    assert Settings.from_config(Config()).context_proposer
    off = load_config(None, overrides={"speculation": {"context_proposer": False}})
    assert not Settings.from_config(off).context_proposer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"target": save_tiny_model(root / "target", seed=1), "draft": save_tiny_model(root / "draft", seed=2)}


@pytest.mark.parametrize("gamma", [None, 3])
async def test_greedy_answers_with_looked_up_drafts_equal_the_targets(folders, gamma):
    """A prompt that repeats itself, so lookups fire from the first round (adaptive γ, and a fixed γ where
    lookups are continued by the model), and the answer, which the tiny target makes repetitive."""
    prompt = [1, 9, 33, 4, 17, 21, 9, 33, 4, 17, 21, 9, 33]
    settings = replace(GREEDY, max_new_tokens=60, gamma=gamma, context_proposer=True)
    expected = reference_greedy(folders["target"], prompt, settings.max_new_tokens)
    async with Verifier(verifier_config(folders["target"])) as verifier:
        client = client_for(verifier.url, folders["draft"])
        try:
            answer = await client.generate(list(prompt), settings)
            off = await client.generate(list(prompt), replace(settings, context_proposer=False))
        finally:
            await client.close()
    assert answer.token_ids == expected == off.token_ids
    stats = answer.to_json()["stats"]
    proposed, accepted = stats["proposed_by_source"], stats["accepted_by_source"]
    assert proposed["context"] + proposed["model"] == answer.stats.drafted
    assert accepted["context"] + accepted["model"] == answer.stats.accepted
    assert accepted["context"] <= proposed["context"]
    assert off.stats.proposed_by_source["context"] == 0
    if gamma is not None:
        # A fixed γ sends what the lookup finds; an adaptive one sends it where the measured rates favour
        # it, which a loaded machine changes, so only the fixed case is sure to carry looked-up drafts.
        assert proposed["context"] > 0 and accepted["context"] > 0
        assert "looked-up drafts accepted" in stats_line(stats, answer.finish_reason)
