"""Where a round's drafts come from: the draft model, the context lookup, or the lookup continued by the
model — whichever the γ controller's own estimate of expected tokens per second favours.

A round of L looked-up tokens then m model drafts yields, in expectation,
1 + A_c(L) + P_c(L) · A_m(m) tokens, with A_c(L) = Σ_{i≤L} a_1·a_2^(i−1) the accepted lookup tokens and
P_c(L) = a_1·a_2^(L−1) the chance all are (a_1, a_2: the lookup's own measured acceptance of a round's
first looked-up token and of each next one, by match length), and A_m(m) = E(m) − 1 the model's accepted
drafts (the controller's per-position estimate); it costs m·t_draft + RTT + t_verify(L + m) — a lookup
costs no drafting. The plan with the most tokens per millisecond wins, against the model's best γ alone.
Acceptance is measured per source: the lookup's here (:class:`SourceAcceptance`), the model's by the
controller as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from specd.desktop.client.adaptive import GammaController
from specd.desktop.client.context_lookup import ContextLookup

# Send a looked-up round ahead when it is used at least this often (it costs nothing to draft).
AHEAD_WORTH = 0.3
# Looked-up drafts by how many tokens matched (2–3, 4–7, 8 or more): a long match is better evidence that
# the text is being copied. Priors for the first looked-up token of a round, and for each next one once the
# ones before it were accepted (a copy, once it starts, tends to go on).
MATCH_BUCKETS = (4, 8)
FIRST_PRIORS = (0.4, 0.6, 0.75)
NEXT_PRIOR = 0.9


class _Rate:
    """Discounted successes / trials, starting from ``prior`` worth two trials."""

    def __init__(self, prior: float, forgetting: float) -> None:
        self.decay = 1.0 - forgetting
        self.success, self.trials = prior * 2.0, 2.0

    def observe(self, successes: float, trials: float) -> None:
        self.success = self.decay * self.success + successes
        self.trials = self.decay * self.trials + trials

    @property
    def value(self) -> float:
        return min(0.99, max(0.01, self.success / self.trials))


class SourceAcceptance:
    """How often looked-up drafts are accepted, measured on their own: the first of a round, and each next
    one given the ones before it were (per position, like the γ controller's h_i, pooled after the first),
    for each match length bucket."""

    def __init__(self, forgetting: float = 0.15) -> None:
        self._first = [_Rate(prior, forgetting) for prior in FIRST_PRIORS]
        self._next = [_Rate(NEXT_PRIOR, forgetting) for _ in FIRST_PRIORS]

    @staticmethod
    def bucket(matched: int) -> int:
        return sum(matched >= edge for edge in MATCH_BUCKETS)

    def observe(self, drafted: int, accepted: int, matched: int = 0) -> None:
        if drafted <= 0:
            return
        b = self.bucket(matched)
        self._first[b].observe(1.0 if accepted > 0 else 0.0, 1.0)
        if accepted > 0 and drafted > 1:  # positions 2… that were judged
            judged = min(drafted, accepted + 1) - 1
            self._next[b].observe(float(accepted - 1), float(judged))

    def first(self, matched: int) -> float:
        return self._first[self.bucket(matched)].value

    def next(self, matched: int) -> float:
        return self._next[self.bucket(matched)].value

    def expected_accepted(self, length: int, matched: int) -> tuple[float, float]:
        """Expected accepted tokens among ``length`` looked-up drafts, and the chance all are accepted."""
        first, following = self.first(matched), self.next(matched)
        total, survive = 0.0, first
        for _ in range(length):
            total += survive
            survive *= following
        return total, (first * following ** (length - 1) if length else 1.0)


@dataclass(frozen=True, slots=True)
class RoundPlan:
    """``lookup`` tokens from the context first, then ``model_gamma`` drafts from the model."""

    lookup: tuple[int, ...]
    model_gamma: int
    matched: int = 0  # how many tokens the lookup matched
    found: tuple[int, ...] = ()  # what the lookup proposed, used or not (its acceptance is measured either way)

    @property
    def gamma(self) -> int:
        return len(self.lookup) + self.model_gamma


@dataclass(frozen=True, slots=True)
class AheadPlan:
    """What the lookup offers the round drafted ahead: its guess of the verifier's next token, the round to
    send after that guess, and whether to bet on it where the drafter guesses otherwise (the lookup's guess
    comes true more often than the drafter's have)."""

    guess: int
    plan: RoundPlan
    trusted: bool


class RoundPlanner:
    """Plans each round from the committed tokens; ``lookup`` None: the model drafts every round."""

    def __init__(self, controller: GammaController, lookup: ContextLookup | None = None,
                 acceptance: SourceAcceptance | None = None) -> None:
        self.controller = controller
        self.lookup = lookup
        self.acceptance = acceptance or SourceAcceptance()

    def plan(self, committed: Sequence[int], remaining: int, max_gamma: int, stop: frozenset[int]) -> RoundPlan:
        controller = self.controller
        gamma = min(controller.choose(remaining), max_gamma)
        if self.lookup is None:
            return RoundPlan((), gamma)
        upper = max(1, min(max_gamma, controller.fixed or controller.gamma_max, remaining - 1))
        self.lookup.sync(committed)
        found, matched = self.lookup.find((), upper)
        return self._choose(_until_stop(found, stop), matched, gamma, upper)

    def plan_ahead(self, committed: Sequence[int], in_flight: Sequence[int], room: int, max_gamma: int,
                   stop: frozenset[int]) -> AheadPlan | None:
        """For the round drafted ahead of ``in_flight`` (after ``committed``): the lookup's guess of the
        verifier's next token and the plan for the round after it. None when the lookup has nothing to
        continue the drafts in flight with."""
        if self.lookup is None or room < 1 or any(token in stop for token in in_flight):
            return None
        controller = self.controller
        upper = max(1, min(max_gamma, controller.fixed or controller.gamma_max, room))
        self.lookup.sync(committed)
        found, matched = self.lookup.find(in_flight, upper + 1)
        if len(found) < 2 or found[0] in stop:
            return None
        gamma = min(controller.choose(room), max_gamma)
        plan = self._choose(_until_stop(found[1:], stop), matched + 1, gamma, upper)
        return AheadPlan(found[0], plan, trusted=self.acceptance.first(matched) > controller.guess_rate)

    def _choose(self, found: list[int], matched: int, gamma: int, upper: int) -> RoundPlan:
        """Of the ``found`` looked-up tokens (by a match of ``matched``), how many to send, continued by how
        many model drafts: the split with the most expected tokens per millisecond, against γ = ``gamma``
        from the model alone."""
        controller = self.controller
        if not found:
            return RoundPlan((), gamma)
        if controller.fixed is not None:  # a fixed γ: the lookup, continued by the model up to γ
            return RoundPlan(tuple(found[:upper]), upper - min(len(found), upper), matched, tuple(found))
        best, best_rate = RoundPlan((), gamma, matched, tuple(found)), controller.rate(gamma)
        est = controller.estimate()
        h = controller.position_acceptance()
        for length in range(1, min(len(found), upper) + 1):
            accepted_lookup, reach = self.acceptance.expected_accepted(length, matched)
            for model_gamma in range(0, upper - length + 1):
                tokens = 1.0 + accepted_lookup + reach * (controller.expected_tokens(model_gamma, h) - 1.0)
                ms = controller.round_ms(length + model_gamma, est) - length * est.draft_ms_per_token
                rate = tokens / max(1e-6, ms)
                if rate > best_rate * (1 + 1e-9):
                    best, best_rate = RoundPlan(tuple(found[:length]), model_gamma, matched, tuple(found)), rate
        return best

    def look_ahead(self, committed: Sequence[int], in_flight: Sequence[int], looked_up: int, matched: int,
                   room: int, max_gamma: int, stop: frozenset[int]) -> tuple[int, list[int], int] | None:
        """A round to send ahead of the round in flight by lookup alone, with no drafting: the lookup's next
        token as the guess of the verifier's, then what follows it. None when there is none, when it would
        rarely be used (the drafts in flight and the guess must all come true; a wrong one costs the verifier
        nothing, it discards the round), or when the model's round drafted ahead is expected to yield more
        per millisecond. ``looked_up`` of the ``in_flight`` drafts came from the lookup, by a match of
        ``matched`` tokens. Returns the guess, the drafts and the match they continue."""
        if self.lookup is None or room < 1 or any(token in stop for token in in_flight):
            return None
        self.lookup.sync(committed)
        upper = max(1, min(max_gamma, self.controller.fixed or self.controller.gamma_max, room))
        found, longer = self.lookup.find(in_flight, upper + 1)
        drafts = _until_stop(found[1:], stop)
        if not drafts or found[0] in stop:
            return None
        controller, h = self.controller, self.controller.position_acceptance()
        in_flight_accepted = 1.0
        for i in range(looked_up, len(in_flight)):  # the model's drafts in flight
            in_flight_accepted *= h[min(i - looked_up, len(h) - 1)]
        if looked_up:
            in_flight_accepted *= self.acceptance.expected_accepted(looked_up, matched)[1]
        if in_flight_accepted * self.acceptance.next(longer) < AHEAD_WORTH:
            return None
        est = controller.estimate()
        accepted, _ = self.acceptance.expected_accepted(len(drafts), longer)
        lookup_rate = (1.0 + accepted) / max(1e-6, controller.round_ms(len(drafts), est)
                                             - len(drafts) * est.draft_ms_per_token)
        if lookup_rate < controller.rate(controller.choose(room)):
            return None
        return found[0], drafts, longer

    def observe(self, looked_up: int, accepted: int, matched: int, found: Sequence[int],
                committed: Sequence[int]) -> None:
        """A verdict accepted ``accepted`` drafts of a round that began with ``looked_up`` looked-up tokens
        (found by a match of ``matched`` tokens) and committed ``committed``. A round that did not use what
        the lookup ``found`` measures it all the same: the committed tokens follow the target's law, so a
        looked-up token equals the committed one exactly as often as the rule would have accepted it
        (p(token)), and the lookup's acceptance is learnt while the model drafts, not only when it is tried."""
        if looked_up:
            self.acceptance.observe(looked_up, min(accepted, looked_up), matched)
            return
        compared = min(len(found), len(committed))
        same = 0
        while same < compared and found[same] == committed[same]:
            same += 1
        self.acceptance.observe(compared, same, matched)


def _until_stop(tokens: list[int], stop: frozenset[int]) -> list[int]:
    """``tokens`` up to and including the first stop token: drafting past it is wasted."""
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[: i + 1]
    return tokens
