"""Ranking draft precisions by measured speed: the γ controller's own estimate of tokens per second.

Each candidate draft answers a few prompts speculatively; a :class:`RecordingController` keeps every
round the answer's γ controller observed (drafted, accepted, draft, network and verify time). To rank,
those rounds are replayed into a fresh :class:`~specd.desktop.client.adaptive.GammaController` per
candidate, and its expected tokens per round over its round time at the best γ — the very figure the
controller maximises each round — gives the candidate's tokens per second. The round trip and the
verifier's cost do not depend on the draft, so they come from every candidate's rounds pooled (one
estimate "at the measured round trip"); acceptance per position and the mean draft time per token are
each candidate's own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from specd.desktop.client.adaptive import EstimatePriors, GammaController

# Replays forget little, so every measured round counts about alike (a live answer forgets faster to follow
# the conversation; a measurement wants the mean).
REPLAY_FORGETTING = 0.02
#: A replay's times are the measured rounds' alone (no built-in guess averaged in).
MEASURED_ONLY = EstimatePriors(samples=0.0)


@dataclass(frozen=True, slots=True)
class MeasuredRound:
    """One speculative round as the γ controller observed it."""

    drafted: int
    accepted: int
    draft_ms: float
    network_ms: float
    verify_ms: float
    cold: bool = False  # an answer's first round: its times include first-call costs


class RecordingController(GammaController):
    """The γ controller of a measuring answer, keeping every round it observes."""

    def __init__(self, gamma_max: int, fixed: int | None = None, **kwargs: Any) -> None:
        super().__init__(gamma_max, fixed, **kwargs)
        self.rounds: list[MeasuredRound] = []

    def observe_round(self, *, drafted: int, accepted: int, draft_ms: float, network_ms: float,
                      verify_ms: float, **more: Any) -> None:
        self.rounds.append(MeasuredRound(drafted, accepted, draft_ms, network_ms, verify_ms, bool(more.get("cold"))))
        super().observe_round(drafted=drafted, accepted=accepted, draft_ms=draft_ms, network_ms=network_ms,
                              verify_ms=verify_ms, **more)  # whatever else the controller observes


@dataclass(frozen=True, slots=True)
class CandidateFigures:
    """What was measured for one precision."""

    precision: str
    rounds: tuple[MeasuredRound, ...]

    @property
    def acceptance(self) -> float:
        drafted = sum(r.drafted for r in self.rounds)
        return sum(r.accepted for r in self.rounds) / drafted if drafted else 0.0

    @property
    def draft_ms_per_token(self) -> float:
        timed = [r for r in self.rounds if r.drafted > 0 and r.draft_ms > 0 and not r.cold]
        drafted = sum(r.drafted for r in timed)
        return sum(r.draft_ms for r in timed) / drafted if drafted else 0.0


@dataclass(frozen=True, slots=True)
class RankedCandidate:
    """A candidate's expected speed, with the figures it comes from."""

    precision: str
    tokens_per_second: float
    gamma: int  # the γ that speed is reached at
    acceptance: float
    draft_ms_per_token: float
    network_ms: float  # the pooled round trip it was ranked at
    verify_ms: float  # the pooled verify time of a round of ``gamma`` drafts
    rounds: int

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision, "expected_tokens_per_second": round(self.tokens_per_second, 2),
                "gamma": self.gamma, "acceptance": round(self.acceptance, 4),
                "draft_ms_per_token": round(self.draft_ms_per_token, 3), "network_ms": round(self.network_ms, 3),
                "verify_ms": round(self.verify_ms, 3), "rounds": self.rounds}

    def describe(self) -> str:
        return (f"{self.precision} {self.tokens_per_second:.1f} tok/s (acceptance {self.acceptance:.2f}, "
                f"{self.draft_ms_per_token:.1f} ms/token, γ {self.gamma})")


def replay(rounds: tuple[MeasuredRound, ...] | list[MeasuredRound], gamma_max: int) -> GammaController:
    """A fresh γ controller that has observed ``rounds``."""
    controller = GammaController(gamma_max, forgetting=REPLAY_FORGETTING, priors=MEASURED_ONLY)
    for r in rounds:
        controller.observe_round(drafted=r.drafted, accepted=r.accepted, draft_ms=r.draft_ms,
                                 network_ms=r.network_ms, verify_ms=r.verify_ms, cold=r.cold)
    return controller


def rank_candidates(measured: list[CandidateFigures], gamma_max: int) -> list[RankedCandidate]:
    """The candidates fastest first (ties keep the given order); those without rounds are left out."""
    usable = [c for c in measured if c.rounds]
    if not usable:
        return []
    pooled = replay([r for c in usable for r in c.rounds], gamma_max).estimate()
    ranked = []
    for candidate in usable:
        own = replay(candidate.rounds, gamma_max)
        # The mean draft time over every round measured (the controller's running value follows the last ones).
        estimate = replace(pooled, alpha=own.alpha, draft_ms_per_token=candidate.draft_ms_per_token)
        best_gamma, best_rate = own.fastest_gamma(gamma_max, estimate)
        verify = pooled.verify_fixed_ms + pooled.verify_per_token_ms * (best_gamma + 1)
        ranked.append(RankedCandidate(candidate.precision, 1000.0 * best_rate, best_gamma, candidate.acceptance,
                                      estimate.draft_ms_per_token, pooled.network_ms, verify,
                                      len(candidate.rounds)))
    return sorted(ranked, key=lambda c: -c.tokens_per_second)  # sorted() is stable: ties keep their order
