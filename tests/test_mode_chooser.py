"""The mode chooser: speculative rounds or the verifier streaming alone, from the client's estimates.

Fed with the measurements a client would make (rounds, streamed tokens and their gaps), no sockets: at a
long round trip streaming wins, at none with good acceptance rounds do, and probes while streaming back
off so that they cost about 2 % of the time.
"""

from __future__ import annotations

import itertools

import pytest

from specd.desktop.client.adaptive import GammaController, ModeChooser, Step

STEP_MS = 30.0  # the verifier's decode step


def chooser(*, network_ms: float, accepted_of_4: int, draft_ms: float = 5.0, verify_ms: float = 32.0,
            rounds: int = 20) -> ModeChooser:
    controller = GammaController(8)
    for _ in range(rounds):
        controller.observe_round(drafted=4, accepted=accepted_of_4, draft_ms=4 * draft_ms, network_ms=network_ms,
                                 verify_ms=verify_ms)
    modes = ModeChooser(controller)
    for gap in (None, STEP_MS, STEP_MS, STEP_MS, STEP_MS):
        modes.observe_stream(1, 25.0, gap)
    return modes


def test_at_a_long_round_trip_streaming_wins_and_asks_a_round_trip_ahead():
    modes = chooser(network_ms=200.0, accepted_of_4=3, draft_ms=8.0)
    step = modes.next_step(200)
    assert step == Step(round=False, stream=step.stream), "not even a round accepted in full beats it: no probe"
    assert step.stream >= 200.0 / STEP_MS  # enough to cover the round trip before the next ask
    assert modes.top_up(200, owed=2) > 0 and modes.top_up(200, owed=50) == 0


def test_without_a_round_trip_good_acceptance_speculates():
    modes = chooser(network_ms=0.0, accepted_of_4=4)
    assert modes.next_step(200) == Step(round=True)
    assert modes.top_up(200, owed=1) == 0, "a stream in flight is left to end: the next step is a round"


def test_the_first_answer_uses_priors_and_the_handshakes_round_trip():
    far, near = GammaController(8), GammaController(8)
    far.observe_network(200.0)
    near.observe_network(1.0)
    first_far = ModeChooser(far).next_step(100)
    assert first_far.stream > 0 and first_far.round, "a probe: acceptance was never measured"
    assert ModeChooser(near).next_step(100) == Step(round=True)


def test_probes_back_off_to_about_two_percent_of_the_time():
    """Poor acceptance at 100 ms: streaming wins, but a round accepted in full would not, so probes go on —
    each one doubling the streaming time before the next, up to the cost divided by 2 %."""
    modes = chooser(network_ms=100.0, accepted_of_4=0)
    controller = modes.controller
    clock, owed, steady, probes, lost = 0.0, 0, False, [], 0.0
    while clock < 600_000.0:
        if owed == 0:
            step = modes.next_step(10**6)
            if step.round:
                gamma = controller.choose(10**6)
                round_ms = gamma * 5.0 + 100.0 + 32.0
                probes.append(clock)
                lost += round_ms - STEP_MS  # the probe's one token, and the time it took
                clock += round_ms
                controller.observe_round(drafted=gamma, accepted=0, draft_ms=5.0 * gamma, network_ms=100.0,
                                         verify_ms=32.0)
            owed += step.stream
            steady = False
            continue
        clock += STEP_MS
        owed -= 1
        modes.observe_stream(1, 25.0, STEP_MS if steady else None)
        steady = owed > 0
        owed += modes.top_up(10**6, owed)
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert len(probes) > 10
    assert all(later >= earlier * 0.95 for earlier, later in itertools.pairwise(gaps)), gaps[:8]
    assert gaps[1] == pytest.approx(2 * gaps[0], rel=0.2), "the interval doubles while probes confirm streaming"
    assert lost / clock == pytest.approx(0.02, abs=0.006), f"{len(probes)} probes cost {lost / clock:.1%}"


def test_a_probe_that_finds_speculation_faster_switches_back():
    modes = chooser(network_ms=20.0, accepted_of_4=0)
    assert modes.next_step(200).stream > 0  # streaming while acceptance is poor
    for _ in range(30):  # the draft now agrees with the target: rounds accepted in full
        modes.controller.observe_round(drafted=4, accepted=4, draft_ms=20.0, network_ms=20.0, verify_ms=32.0)
    assert modes.top_up(200, owed=1) == 0 and modes.next_step(200) == Step(round=True)
