"""A scripted answer for the mode chooser: rounds and streamed stretches on a clock, no sockets, no models.

Costs are functions of the clock (so a verifier can become fast or slow mid-answer) and the first call of
each kind can be made cold. Acceptance is drawn from a seeded generator, so a run is reproducible. The
timing follows the client: a round costs γ·t_draft + RTT + t_verify(γ + 1); a stream asked for with a
round (a probe) starts right after that round's verify; a stream asked for alone costs a round trip
before its first token; tokens then arrive one decode step apart while enough are asked for ahead.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from specd.desktop.client.adaptive import GammaController, ModePolicy, Step

Cost = Callable[[float], float]  # the clock in ms → a cost in ms


def const(value: float) -> Cost:
    return lambda _now: value


def switch_at(at_ms: float, before: float, after: float) -> Cost:
    return lambda now: before if now < at_ms else after


@dataclass(slots=True)
class Costs:
    draft_ms: Cost = field(default_factory=lambda: const(13.0))  # per draft token
    rtt_ms: Cost = field(default_factory=lambda: const(0.0))
    step_ms: Cost = field(default_factory=lambda: const(66.0))  # the verifier's decode step
    verify_fixed_ms: Cost = field(default_factory=lambda: const(60.0))  # a forward over γ+1 positions:
    verify_per_token_ms: Cost = field(default_factory=lambda: const(4.0))  # fixed + per_token·(γ+1)
    alpha: float = 0.9
    first_prompt_read_ms: float = 0.0  # the drafter's first call of all reads the prompt cold, before a round
    cold_extra_network_ms: float = 0.0  # the first round waits for the prompt's prefill
    first_accepts: int | None = None  # how many drafts the very first round accepts (None: drawn)
    stated_step: bool = False  # the verifier states its decode step (welcome, verdicts), as specd-verifier does
    stream_probs: bool = False  # the verifier sends each streamed token's p, and the drafter scores it

    def verify(self, now: float, gamma: int) -> float:
        return self.verify_fixed_ms(now) + self.verify_per_token_ms(now) * (gamma + 1)


@dataclass(slots=True)
class Trace:
    ms: float = 0.0
    tokens: int = 0
    streamed: int = 0
    rounds: int = 0
    steps: list[tuple[float, int, Step]] = field(default_factory=list)  # (clock, tokens so far, step)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (clock, tokens) at every commit

    def tokens_at(self, clock_ms: float) -> int:
        """Tokens committed when the answer's clock reached ``clock_ms``."""
        before = [tokens for clock, tokens in self.timeline if clock <= clock_ms]
        return before[-1] if before else 0


class Simulation:
    """Answers on one client: the controller and the policy persist across answers, like EdgeClient's."""

    def __init__(self, costs: Costs, controller: GammaController, policy: ModePolicy | None, *, seed: int = 0):
        self.costs, self.controller, self.policy = costs, controller, policy
        self.clock = 0.0
        self.rng = random.Random(seed)
        self.first_round = True
        self._start = 0.0
        self._scored = -2  # the streamed-token count at the drafter's last score
        self._score_at = 0.0  # the clock before which the drafter does not score again

    def answer(self, tokens: int) -> Trace:
        trace, start = Trace(), self.clock
        self._start = start
        owed, fresh_answer = 0, True
        while trace.tokens < tokens:
            remaining = tokens - trace.tokens
            step = self.policy.next_step(remaining) if self.policy is not None else Step(round=True)
            trace.steps.append((self.clock - start, trace.tokens, step))
            if step.round:
                trace.tokens += self._round(remaining, cold=fresh_answer)
                trace.timeline.append((self.clock - start, trace.tokens))
                trace.rounds += 1
                fresh_answer = False
                remaining = tokens - trace.tokens
                if step.stream and remaining > 0:
                    owed = min(step.stream, remaining)
                    self._stream(trace, tokens, owed, after_round=True)
            elif step.stream:
                self.clock += self.costs.rtt_ms(self.clock)  # the ask travels, the first token comes back
                self._stream(trace, tokens, min(step.stream, remaining), after_round=False)
        trace.ms = self.clock - start
        return trace

    def _round(self, remaining: int, *, cold: bool) -> int:
        costs, now = self.costs, self.clock
        gamma = self.controller.choose(remaining)
        if self.first_round:  # the round loop lets the drafter read the prompt before it times a round
            self.clock += costs.first_prompt_read_ms
        draft = gamma * costs.draft_ms(now)
        network = costs.rtt_ms(now) + (costs.cold_extra_network_ms if self.first_round else 0.0)
        verify = costs.verify(now, gamma)
        if self.first_round and costs.first_accepts is not None:
            accepted = min(gamma, costs.first_accepts)
        else:
            accepted = 0
            while accepted < gamma and self.rng.random() < costs.alpha:
                accepted += 1
        self.first_round = False
        self.clock += draft + network + verify
        self.controller.observe_round(drafted=gamma, accepted=accepted, draft_ms=draft, network_ms=network,
                                      verify_ms=verify, cold=cold)
        if costs.stated_step:
            self.controller.observe_server_step(costs.step_ms(self.clock))
        return min(remaining, accepted + 1)

    def _score(self, streamed: int, remaining: int) -> None:
        """The drafter scores the streamed token if its share of time allows (stream_scoring.py): a sample
        of α (here 0 or 1), and a draft step's time; it worked two steps when it read earlier tokens first."""
        share = self.policy.scoring_share(remaining)
        if share <= 0 or self.clock < self._score_at:
            return
        self.controller.observe_streamed_acceptance(1.0 if self.rng.random() < self.costs.alpha else 0.0)
        draft_ms = self.costs.draft_ms(self.clock)
        self.controller.observe_draft_time(draft_ms)
        worked_ms = draft_ms if self._scored == streamed - 1 else 2 * draft_ms
        self._scored, self._score_at = streamed, self.clock + worked_ms * (1.0 / share - 1.0)

    def _stream(self, trace: Trace, tokens: int, owed: int, *, after_round: bool) -> None:
        """Tokens one decode step apart; a top-up that reaches the verifier after it ran dry stalls it."""
        del after_round  # the round before a probe's stream already paid the round trip
        steady, stall = False, 0.0
        while owed > 0 and trace.tokens < tokens:
            step = self.costs.step_ms(self.clock)
            self.clock += step + stall
            owed -= 1
            trace.tokens += 1
            trace.streamed += 1
            trace.timeline.append((self.clock - self._start, trace.tokens))
            self.policy.observe_stream(1, step, step + stall if steady else None)
            if self.costs.stream_probs:
                self._score(trace.streamed, tokens - trace.tokens)
            steady, stall = owed > 0, 0.0
            if trace.tokens < tokens:
                more = self.policy.top_up(tokens - trace.tokens, owed)
                if more:
                    stall = max(0.0, self.costs.rtt_ms(self.clock) - owed * step)
                    steady = steady or stall == 0.0
                    owed += more
