"""Where a round's drafts come from: the draft model, the context lookup, or the lookup continued by the
model — whichever the γ controller's own estimate of expected tokens per second favours.

A round of L looked-up tokens then m model drafts yields, in expectation,
1 + A_c(L) + α_c^L · A_m(m) tokens, with A_c(L) = Σ_{i≤L} α_c^i the accepted lookup tokens (α_c: the
lookup's own measured acceptance) and A_m(m) = E(m) − 1 the model's accepted drafts (the controller's
per-position estimate); it costs m·t_draft + RTT + t_verify(L + m) — a lookup costs no drafting. The plan
with the most tokens per millisecond wins, against the model's best γ alone. Acceptance is measured per
source: the lookup's here (:class:`SourceAcceptance`), the model's by the controller as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from specd.desktop.client.adaptive import GammaController
from specd.desktop.client.context_lookup import ContextLookup

# Send a looked-up round ahead when it is used at least this often (it costs nothing to draft).
AHEAD_WORTH = 0.3


class SourceAcceptance:
    """Per-token acceptance of one draft source as discounted successes / trials of the geometric
    acceptance process (the γ controller's estimator)."""

    def __init__(self, prior: float = 0.6, forgetting: float = 0.15) -> None:
        self.forgetting = forgetting
        self._success, self._trials = prior * 2.0, 2.0

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        decay = 1.0 - self.forgetting
        self._success = decay * self._success + accepted
        self._trials = decay * self._trials + accepted + (1.0 if accepted < drafted else 0.0)

    @property
    def alpha(self) -> float:
        return min(0.99, max(0.01, self._success / self._trials))


@dataclass(frozen=True, slots=True)
class RoundPlan:
    """``lookup`` tokens from the context first, then ``model_gamma`` drafts from the model."""

    lookup: tuple[int, ...]
    model_gamma: int

    @property
    def gamma(self) -> int:
        return len(self.lookup) + self.model_gamma


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
        found = _until_stop(self.lookup.continuation((), upper), stop)
        if not found:
            return RoundPlan((), gamma)
        if controller.fixed is not None:  # a fixed γ: the lookup, continued by the model up to γ
            return RoundPlan(tuple(found[:upper]), upper - min(len(found), upper))
        best, best_rate = RoundPlan((), gamma), controller.rate(gamma)
        est = controller.estimate()
        alpha, h = self.acceptance.alpha, controller.position_acceptance()
        for length in range(1, len(found) + 1):
            accepted_lookup = sum(alpha ** i for i in range(1, length + 1))
            reach = alpha ** length
            for model_gamma in range(0, upper - length + 1):
                tokens = 1.0 + accepted_lookup + reach * (controller.expected_tokens(model_gamma, h) - 1.0)
                ms = controller.round_ms(length + model_gamma, est) - length * est.draft_ms_per_token
                rate = tokens / max(1e-6, ms)
                if rate > best_rate * (1 + 1e-9):
                    best, best_rate = RoundPlan(tuple(found[:length]), model_gamma), rate
        return best

    def look_ahead(self, committed: Sequence[int], in_flight: Sequence[int], room: int, max_gamma: int,
                   stop: frozenset[int]) -> tuple[int, list[int]] | None:
        """A round to send ahead of a looked-up round in flight, by lookup alone: the lookup's next token as
        the guess of the verifier's, then what follows it; None when there is none or it would rarely be
        used (the in-flight drafts and the guess must all come true, each about as often as a looked-up
        token is accepted; a wrong one costs the verifier nothing, it discards the round)."""
        if self.lookup is None or room < 1 or any(token in stop for token in in_flight):
            return None
        if self.acceptance.alpha ** (len(in_flight) + 1) < AHEAD_WORTH:
            return None
        self.lookup.sync(committed)
        upper = max(1, min(max_gamma, self.controller.fixed or self.controller.gamma_max, room))
        found = self.lookup.continuation(in_flight, upper + 1)
        if len(found) < 2 or found[0] in stop:
            return None
        return found[0], _until_stop(found[1:], stop)

    def observe(self, plan_lookup: int, accepted: int) -> None:
        """A verdict accepted ``accepted`` drafts of a round that began with ``plan_lookup`` looked-up tokens."""
        self.acceptance.observe(plan_lookup, min(accepted, plan_lookup))


def _until_stop(tokens: list[int], stop: frozenset[int]) -> list[int]:
    """``tokens`` up to and including the first stop token: drafting past it is wasted."""
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[: i + 1]
    return tokens
