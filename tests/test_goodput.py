"""The goodput budget's choice (daemon/goodput.py) against scripted forward costs and acceptances, and the
engine trimming rounds to it: a trimmed round is judged as a round of fewer drafts, greedy answers equal
the target's own, and the session's suggested γ follows the load."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from specd.daemon.engine import Engine, EngineLimits
from specd.daemon.goodput import (
    EXPLORE_AFTER,
    EXPLORE_BURST,
    EXPLORE_SHARE,
    Acceptance,
    ForwardCost,
    Offer,
    choose,
    expected_tokens,
    suggested_gamma,
)
from specd.daemon.rounds import RoundDrafts, round_verdict
from specd.daemon.target import TargetModel
from specd.shared.sampling import SamplingParams
from tests.tiny_models import tiny_llama

GREEDY = SamplingParams(temperature=0.0)


def scripted(per_row_ms: float, per_position_ms: float, fixed_ms: float = 0.0, rows=(1, 4, 16, 64)) -> ForwardCost:
    """A cost model calibrated on forwards that cost exactly ``fixed + per_row·rows + per_position·rows·width``."""
    cost = ForwardCost()
    cost.calibrate([(r, w, (fixed_ms + per_row_ms * r + per_position_ms * r * w) / 1000)
                    for r in rows for w in (1, 3, 9)])
    return cost


def offers(n: int, drafts: int, rate: float) -> list[Offer]:
    return [Offer(drafts=drafts, h=[rate] * 16) for _ in range(n)]


def test_expected_tokens_is_one_plus_the_surviving_prefix():
    assert expected_tokens([0.5] * 4, 0) == 1.0
    assert expected_tokens([0.5] * 4, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens([1.0, 0.0, 1.0], 3) == 2.0


def test_a_flat_forward_cost_verifies_every_draft():
    """Weights read once per forward (a GPU at small batch): extra positions are nearly free."""
    cost = scripted(per_row_ms=0.1, per_position_ms=0.01, fixed_ms=20.0)
    choice = choose(offers(8, 8, 0.5), cost, max_rows=64, max_positions=4096)
    assert choice.width == 9 and choice.rows == 8


def test_a_cost_in_proportion_to_positions_verifies_nothing_at_low_acceptance():
    """Each position costs as much as a cloud step: a draft accepted 30 % of the time never pays."""
    cost = scripted(per_row_ms=0.0, per_position_ms=10.0)
    choice = choose(offers(32, 8, 0.3), cost, max_rows=64, max_positions=4096)
    assert choice.width == 1  # one cloud step per session
    assert choice.verified(Offer(drafts=8, h=[0.3] * 8)) == 0


def test_the_width_moves_with_the_load_and_the_acceptance():
    """A per-session cost (fixed work per row) plus a per-position one: more sessions or a weaker draft
    narrow the forward, as the best fixed γ of the capacity runs does."""
    cost = ForwardCost()
    # Sublinear in rows, as on a CPU: one row of width w costs 20 + w ms, 64 rows 100 + 60w ms.
    cost.calibrate([(1, w, (20 + w) / 1000) for w in (1, 3, 9)] + [(64, w, (100 + 60 * w) / 1000) for w in (1, 3, 9)])
    few = choose(offers(1, 8, 0.8), cost, max_rows=64, max_positions=4096).width
    many = choose(offers(64, 8, 0.8), cost, max_rows=64, max_positions=4096).width
    weak = choose(offers(64, 8, 0.5), cost, max_rows=64, max_positions=4096).width
    assert few == 9 and 1 < weak < many < few


def test_the_choice_maximises_goodput_over_every_width():
    cost = scripted(per_row_ms=1.0, per_position_ms=2.0, fixed_ms=5.0)
    ready = [Offer(drafts=d, h=[0.9, 0.7, 0.5, 0.3, 0.2, 0.1, 0.1, 0.1]) for d in (8, 4, 2, 6)]
    choice = choose(ready, cost, max_rows=64, max_positions=4096)

    def rate(width: int) -> float:
        return sum(expected_tokens(o.h, min(o.drafts, width - 1)) for o in ready) / cost.seconds(4, width)

    assert rate(choice.width) >= max(rate(w) for w in range(1, 10)) / 1.02  # within the margin
    assert [choice.verified(o) for o in ready] == [min(o.drafts, choice.width - 1) for o in ready]


def test_max_positions_leaves_rows_for_the_next_forward():
    cost = scripted(per_row_ms=0.0, per_position_ms=0.001, fixed_ms=50.0)  # nearly flat: wide is best
    choice = choose(offers(10, 8, 0.9), cost, max_rows=64, max_positions=36)
    assert choice.width * choice.rows <= 36 and choice.rows >= 1


def test_a_width_that_leaves_rounds_for_another_forward_pays_for_that_forward():
    """64 sessions, 512 positions a forward: width 9 takes 56 rows and leaves 8 rounds for a forward of
    their own, which costs its fixed part again. Judged on the one forward alone width 9 looked best; over
    every ready round, width 8, which takes all 64 in one forward, is."""
    cost = scripted(per_row_ms=3.0, per_position_ms=2.0, fixed_ms=100.0)
    ready = offers(64, 8, 0.99)
    choice = choose(ready, cost, max_rows=64, max_positions=512)
    assert (choice.width, choice.rows) == (8, 64)
    alone = sum(expected_tokens(o.h, 8) for o in ready[:56]) / cost.seconds(56, 9)
    assert alone > choice.goodput  # what width 9 promised for its own forward
    assert suggested_gamma(ready, cost, ceiling=8, max_rows=64, max_positions=512) == 7
    few = choose(offers(56, 8, 0.99), cost, max_rows=64, max_positions=512)
    assert (few.width, few.rows) == (9, 56)  # where every round fits, the widest still wins


def test_idle_time_between_forwards_favours_verifying_everything():
    """A lone client drafting while the verifier waits: trimming would save time nobody else uses."""
    cost = scripted(per_row_ms=0.0, per_position_ms=10.0)
    assert choose(offers(1, 8, 0.6), cost, max_rows=64, max_positions=4096).width < 9
    assert choose(offers(1, 8, 0.6), cost, max_rows=64, max_positions=4096, idle_s=1.0).width == 9


def test_the_suggested_gamma_is_what_the_load_would_verify():
    cost = ForwardCost()
    cost.calibrate([(1, w, (20 + w) / 1000) for w in (1, 3, 9)] + [(64, w, (100 + 60 * w) / 1000) for w in (1, 3, 9)])
    lone = suggested_gamma(offers(1, 2, 0.8), cost, ceiling=16, max_rows=64, max_positions=4096)
    crowd = suggested_gamma(offers(64, 8, 0.8), cost, ceiling=16, max_rows=64, max_positions=4096)
    assert lone > 2  # more than it offered: the hint can grow again
    assert 1 <= crowd < lone
    flat_out = suggested_gamma(offers(64, 8, 0.1), scripted(0.0, 10.0), ceiling=16, max_rows=64, max_positions=4096)
    assert flat_out == 1  # never 0: a round needs a draft


def test_the_cost_level_follows_measured_forwards_and_keeps_its_shape():
    cost = scripted(per_row_ms=1.0, per_position_ms=2.0, fixed_ms=5.0)
    before = cost.seconds(16, 3) / cost.seconds(16, 1)
    for _ in range(100):  # the machine got twice as slow
        cost.observe(16, 2, 2 * cost._shape(16, 2))
    assert cost.seconds(16, 2) == pytest.approx(2 * cost._shape(16, 2), rel=1e-3)
    assert cost.seconds(16, 3) / cost.seconds(16, 1) == pytest.approx(before)
    assert cost.seconds(4, 3) == pytest.approx(cost.scale * cost._shape(4, 3))  # rows never run: the level only


def test_acceptance_counts_only_judged_drafts():
    acc = Acceptance(positions=4)
    for _ in range(50):
        acc.observe(verified=2, accepted=2)  # both verified accepted; drafts 3-4 never judged
    h = acc.conditional(4)
    assert h[0] > 0.95 and h[1] > 0.95
    assert h[2] == pytest.approx(acc.overall) and h[3] == pytest.approx(acc.overall)
    for _ in range(50):
        acc.observe(verified=4, accepted=0)
    assert acc.conditional(1)[0] < 0.1


def test_a_session_takes_the_populations_shape_at_positions_it_rarely_had_judged():
    """Every session's rounds pooled: acceptance that rises along the round (0.5, then 0.8, 0.9, 0.94 once
    the drafts before held). A new session starts from the population's overall rate; one whose first
    drafts were rejected three times keeps that (its own position 1), and its unjudged positions take the
    population's rising shape at its own lower level, not one flat rate."""
    population = Acceptance.pooled(positions=4)
    counts = [0] * 50 + [1] * 10 + [2] * 4 + [3] * 2 + [4] * 34  # accepted drafts of rounds of 4
    rounds = [counts[(i * 37) % 100] for i in range(100)]  # interleaved: the population forgets slowly
    for accepted in rounds * 3:
        population.observe(verified=4, accepted=accepted)
    shape = population.conditional(4)
    assert shape[0] == pytest.approx(0.5, abs=0.03) and shape[1] == pytest.approx(0.8, abs=0.05)
    assert shape[0] < shape[1] < shape[2] < shape[3]
    fresh = Acceptance(positions=4, population=population)
    assert fresh.overall == pytest.approx(population.overall)
    weak = Acceptance(positions=4, population=population)
    for _ in range(3):
        weak.observe(verified=4, accepted=0)
    h = weak.conditional(4)
    assert h[0] < 0.3
    assert h[1] < h[2] < h[3] and all(mine < theirs for mine, theirs in zip(h[1:], shape[1:], strict=True))
    alone = Acceptance(positions=4)  # without a population: one flat rate past the judged positions
    for _ in range(3):
        alone.observe(verified=4, accepted=0)
    assert alone.conditional(4)[1] == alone.conditional(4)[3]


# -- the engine trims rounds to the budget ------------------------------------------------------

@pytest.fixture
def engine_factory():
    executor = ThreadPoolExecutor(max_workers=1)
    model = tiny_llama(1)
    target = TargetModel(model, None, name="tiny", device=torch.device("cpu"), dtype=torch.float32)

    def make(cost: ForwardCost, sessions: int = 4, max_batch_tokens: int = 512) -> Engine:
        limits = EngineLimits(max_sessions=sessions, slot_len=128, goodput_budget=True, max_draft=8,
                              max_batch_tokens=max_batch_tokens)
        return Engine.create(target, limits, executor, cost)

    yield model, make
    executor.shutdown(wait=False)


def _greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


async def _greedy_session(engine: Engine, prompt: list[int], n: int, drafts: list[int],
                          log: list[tuple[int, int]]) -> list[int]:
    session = engine.open()
    committed = list(prompt)
    await engine.prefill(session, committed, 0)
    while len(committed) - len(prompt) < n:
        judged, _q, _r = await engine.run(session, committed[:-1], [committed[-1], *drafts],
                                          round_verdict(RoundDrafts(torch.tensor(drafts)), GREEDY, 0, len(committed)),
                                          drafts=len(drafts))
        session.acceptance.observe(judged.verified, judged.accepted)
        log.append((judged.verified, session.suggested_gamma))
        committed += [*drafts[:judged.accepted], judged.token]
    engine.close(session)
    return committed[len(prompt):len(prompt) + n]


@pytest.mark.parametrize("per_position_ms", [1000.0, 0.001], ids=["trimmed", "whole"])
async def test_trimmed_rounds_give_the_targets_own_greedy_answer(engine_factory, per_position_ms):
    """Under a budget that trims every round to nothing (or verifies all), four concurrent greedy sessions
    still produce the target's own greedy continuation."""
    model, make = engine_factory
    engine = make(scripted(per_row_ms=0.0, per_position_ms=per_position_ms, fixed_ms=10.0))
    prompts = [[1, 5, 6, 7], [1, 9, 10], [1, 20, 21, 22, 23], [1, 3]]
    drafts = [4, 4, 4]  # rarely the target's choice: acceptance falls, the budget trims
    logs: list[list[tuple[int, int]]] = [[] for _ in prompts]
    answers = await asyncio.gather(*(_greedy_session(engine, p, 12, drafts, log)
                                     for p, log in zip(prompts, logs, strict=True)))
    await engine.close_all()
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer == _greedy_reference(model, prompt, 12)
    verified = [v for log in logs for v, _ in log]
    hints = [h for log in logs for _, h in log]
    if per_position_ms > 1:
        assert verified[-1] == 0 and min(verified) == 0 and min(hints) == 1
    else:  # verified whole at first; once nearly every draft is wrong, a cloud step does as well
        assert verified[0] == 3 and max(hints) == 8


async def test_a_sampled_round_trimmed_to_k_is_judged_as_a_round_of_k(engine_factory):
    """The verdict of a round the engine trimmed to k drafts is the verdict of the same k drafts sent alone:
    same seed, same position, same draws."""
    torch.manual_seed(0)
    vocab, gamma, k = 64, 4, 2
    drafts = torch.tensor([5, 6, 7, 8])
    ids = torch.stack([torch.randperm(vocab)[:8] for _ in range(gamma)])
    ids[:, 0] = drafts
    q = torch.softmax(torch.randn(gamma, 8), dim=-1)
    logits = torch.randn(gamma + 1, vocab)
    params = SamplingParams(temperature=1.0)
    whole = round_verdict(RoundDrafts(drafts, ids, q), params, seed=3, position=10)
    alone = round_verdict(RoundDrafts(drafts[:k], ids[:k], q[:k]), params, seed=3, position=10)
    for seed_logits in range(20):
        torch.manual_seed(seed_logits)
        logits = torch.randn(gamma + 1, vocab)
        trimmed = whole(logits[:k + 1])
        assert trimmed.verified == k and trimmed == alone(logits[:k + 1])
    assert whole(logits[:1]).verified == 0


def test_a_width_never_run_is_judged_between_the_widths_that_ran():
    """Forwards of widths 1 and 3 ran cheaper than calibrated: width 2 is not left at the old shape (which
    would make it look dearer than both and lock the budget at width 1)."""
    cost = scripted(per_row_ms=0.0, per_position_ms=10.0)
    for _ in range(60):
        for width in (1, 3):
            cost.observe(64, width, 0.5 * cost._shape(64, width))
    assert cost.seconds(64, 1) < cost.seconds(64, 2) < cost.seconds(64, 3)
    ratio = cost.seconds(64, 2) / cost.seconds(64, 1)
    assert ratio == pytest.approx(2.0, rel=0.05)  # the calibrated shape's ratio, at the measured level


async def test_a_session_trimmed_to_nothing_has_a_draft_verified_now_and_then(engine_factory):
    """A session whose drafts were all trimmed away for EXPLORE_AFTER rounds has one verified in its next
    round, and in every round after while those are accepted: without it the acceptance is never measured
    again, and drafts that became right (text copied from the conversation) would stay trimmed for good."""
    model, make = engine_factory
    cost = scripted(per_row_ms=0.0, per_position_ms=3.5, fixed_ms=60.0)  # a CPU's shape
    cost.observe = lambda *_args: None  # the tiny model's own timings would make every width look free
    engine = make(cost, sessions=1)
    prompt = [1, 5, 6, 7]
    reference = _greedy_reference(model, prompt, 120)
    session = engine.open()
    committed = list(prompt)
    await engine.prefill(session, committed, 0)
    verified_log = []
    while len(committed) < 100:
        made = len(committed) - len(prompt)
        wrong = len(verified_log) < 30
        drafts = [4, 4, 4] if wrong else reference[made:made + 3]  # rarely the target's choice, then its own
        judged, _q, _r = await engine.run(session, committed[:-1], [committed[-1], *drafts],
                                          round_verdict(RoundDrafts(torch.tensor(drafts)), GREEDY, 0, len(committed)),
                                          drafts=len(drafts))
        session.acceptance.observe(judged.verified, judged.accepted)
        verified_log.append(judged.verified)
        committed += [*drafts[:judged.accepted], judged.token]
    engine.close(session)
    await engine.close_all()
    assert committed[len(prompt):] == reference[:len(committed) - len(prompt)]
    first_trim = verified_log.index(0)
    assert first_trim < 30 - EXPLORE_AFTER - 1
    assert verified_log[first_trim:first_trim + EXPLORE_AFTER + 1] == [0] * EXPLORE_AFTER + [1], str(verified_log)
    right = verified_log[30:]
    explored = right.index(1)
    assert explored <= EXPLORE_AFTER and min(right[explored:]) >= 1, str(verified_log)


async def test_starved_sessions_explored_together_stay_within_the_batch_token_limit(engine_factory):
    """Eight starved sessions at once, with room for eight positions a forward: exploring verifies one
    draft each in forwards of at most four rows, never one forward of sixteen positions."""
    model, make = engine_factory
    cost = scripted(per_row_ms=0.0, per_position_ms=1000.0, fixed_ms=10.0)
    engine = make(cost, sessions=8, max_batch_tokens=8)
    forwards: list[tuple[int, int]] = []
    observe = cost.observe

    def record(rows: int, width: int, seconds: float) -> None:
        forwards.append((rows, width))
        observe(rows, width, seconds)

    cost.observe = record
    prompts = [[1, 5 + i, 6, 7] for i in range(8)]
    logs: list[list[tuple[int, int]]] = [[] for _ in prompts]
    answers = await asyncio.gather(*(_greedy_session(engine, p, 14, [4, 4, 4], log)
                                     for p, log in zip(prompts, logs, strict=True)))
    await engine.close_all()
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer == _greedy_reference(model, prompt, 14)
    assert any(width == 2 for _rows, width in forwards), forwards  # exploring happened
    assert max(rows * width for rows, width in forwards) <= 8, forwards


async def test_capacity_cells_share_one_population_as_one_verifiers_sessions_do():
    """``specd-verifier capacity`` runs one load after another on one verifier: a budget cell's sessions
    start from the acceptance of the rounds judged before it, so drafts that were all accepted are verified
    whole from the first round, where a verifier just started trims them at the prior (--fresh-population)."""
    from specd.daemon.capacity import RecordedRound, RecordedSession, measure

    executor = ThreadPoolExecutor(max_workers=1)
    target = TargetModel(tiny_llama(1), None, name="tiny", device=torch.device("cpu"), dtype=torch.float32)
    recording = [RecordedSession(prompt=[1, 5, 6, 7], rounds=[RecordedRound([8, 9, 10, 11], accepted=4)])]
    cost = scripted(per_row_ms=0.0, per_position_ms=10.0, fixed_ms=10.0)  # at the prior (0.6) one draft pays
    cost.observe = lambda *_args: None  # the tiny model's own timings would make every width look free
    common = dict(sessions=1, gamma=4, tokens=10, max_batch_tokens=64, executor=executor, cost=cost)
    try:
        population = Acceptance.pooled()
        await measure(target, recording, mode="speculative", batched=True, population=population, **common)
        assert population.overall > 0.9
        warm = await measure(target, recording, mode="speculative", batched=True, budget=True,
                             population=population, **common)
        cold = await measure(target, recording, mode="speculative", batched=True, budget=True, **common)
    finally:
        executor.shutdown(wait=False)
    assert warm.verified_gamma == 4 and cold.verified_gamma < 2, (warm, cold)


async def test_a_capacity_cell_keeps_every_session_busy_to_its_end():
    """A session that has its tokens goes on with its user's next request until every session has them, so
    a cell measures N sessions busy: sessions whose drafts are all accepted beside sessions whose drafts
    never are leave no tail of forwards over the slow ones alone (2.4 rows a forward of 4 when each
    stopped at its tokens)."""
    from specd.daemon.capacity import RecordedRound, RecordedSession, measure

    target = TargetModel(tiny_llama(1), None, name="tiny", device=torch.device("cpu"), dtype=torch.float32)
    recording = [RecordedSession(prompt=[1, 5, 6, 7], rounds=[RecordedRound([8, 9, 10, 11], accepted=4)]),
                 RecordedSession(prompt=[1, 5, 6, 9], rounds=[RecordedRound([8, 9, 10, 11], accepted=0)])]
    with ThreadPoolExecutor(max_workers=1) as executor:
        cell = await measure(target, recording, mode="speculative", batched=True, sessions=4, gamma=4, tokens=10,
                             max_batch_tokens=64, executor=executor)
        cloud = await measure(target, recording, mode="cloud", batched=True, sessions=4, gamma=4, tokens=10,
                              max_batch_tokens=64, executor=executor)
    assert cell.forwards == 10 and cell.mean_batch == 4, cell  # ten forwards of 4 (10 and 2.4 before)
    assert cell.tokens >= 2 * 10 + 2 * 5 * 10, cell  # the fast sessions answered five requests meanwhile
    assert cloud.forwards == 10 and cloud.mean_batch == 4 and cloud.tokens == 40, cloud


def test_drafts_are_verified_only_where_they_clearly_beat_a_cloud_step():
    """Where verifying a draft is predicted a few per cent better than one cloud step per session, within
    the cost model's error, the budget takes the cloud step; where it is clearly better, the draft."""
    cost = scripted(per_row_ms=0.0, per_position_ms=10.0, fixed_ms=100.0)  # 110 ms at width 1, 120 at 2
    sizes = dict(max_rows=8, max_positions=512)
    assert choose([Offer(drafts=1, h=[0.12])], cost, **sizes).width == 1  # 1.12/120 against 1/110: +2.7 %
    assert choose([Offer(drafts=1, h=[0.3])], cost, **sizes).width == 2  # +19 %


async def test_exploring_starved_sessions_takes_a_bounded_share_of_a_full_batchs_time(engine_factory):
    """Sixty-four sessions whose drafts are all wrong: the budget verifies none, and every forward that
    explores them is padded to width 2 for all 64 rows (+55 % here). Exploring happens, within
    EXPLORE_SHARE of the forwards' predicted time (plus the banked burst)."""
    _model, make = engine_factory
    cost = scripted(per_row_ms=0.0, per_position_ms=2.3, fixed_ms=120.0)  # 267 ms at width 1, 414 at 2
    engine = make(cost, sessions=64)
    forwards: list[tuple[int, int]] = []

    def record(rows: int, width: int, _seconds: float) -> None:
        forwards.append((rows, width))  # not learnt: the tiny model's own timings would make every width free

    cost.observe = record
    prompts = [[1, 5 + i % 50, 6 + i // 50, 7] for i in range(64)]
    logs: list[list[tuple[int, int]]] = [[] for _ in prompts]
    await asyncio.gather(*(_greedy_session(engine, p, 60, [4, 4, 4], log)
                           for p, log in zip(prompts, logs, strict=True)))
    await engine.close_all()
    rounds = [(rows, width) for rows, width in forwards if rows > 1]
    explored = [(rows, width) for rows, width in rounds if width == 2]
    extra = sum(cost.seconds(rows, 2) - cost.seconds(rows, 1) for rows, _ in explored)
    total = sum(cost.seconds(rows, width) for rows, width in rounds)
    assert explored, rounds
    assert extra <= EXPLORE_SHARE * total + EXPLORE_BURST * (cost.seconds(64, 2) - cost.seconds(64, 1)), (extra, total)


async def test_the_decode_step_the_verifier_states_is_its_cost_models_for_the_sessions_with_work(engine_factory):
    """``decode_step_ms`` (welcome, verdicts) is the cost model's forward of one position for the sessions
    with work now and the one asking; an engine that never calibrated states none."""
    _model, make = engine_factory
    engine = make(scripted(per_row_ms=5.0, per_position_ms=1.0, fixed_ms=10.0))
    assert engine.decode_step_ms() == pytest.approx(1000.0 * engine.cost.seconds(1, 1))
    sessions = [engine.open() for _ in range(3)]
    jobs = [asyncio.create_task(engine.prefill(session, [1, 2, 3, 4, 5], 0)) for session in sessions]
    await asyncio.sleep(0)  # the three prefills are queued or running
    assert engine.decode_step_ms() == pytest.approx(1000.0 * engine.cost.seconds(4, 1))
    assert engine.decode_step_ms() > 1000.0 * engine.cost.seconds(1, 1)
    await asyncio.gather(*jobs)
    await engine.close_all()
    with ThreadPoolExecutor(max_workers=1) as executor:
        assert Engine(engine.target, engine.backend, engine.limits, executor).decode_step_ms() == 0.0
