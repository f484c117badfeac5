"""Adaptive draft length: pick γ each round to maximise expected tokens per second.

With per-token acceptance α, a round of γ drafts yields E(α, γ) = (1 − α^(γ+1)) / (1 − α) tokens and
costs γ·t_draft + R + t_verify(γ). Every input is estimated online from the rounds just seen
(exponential forgetting), so γ follows the conversation: long when the draft agrees with the target,
short when it does not or when drafting is slow compared to the round trip.
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens emitted by one round of ``gamma`` drafts (accepted drafts plus one)."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


class _Ema:
    def __init__(self, value: float, weight: float) -> None:
        self.value = value
        self.weight = weight
        self.seen = False

    def update(self, sample: float) -> None:
        self.value = sample if not self.seen else (1 - self.weight) * self.value + self.weight * sample
        self.seen = True


@dataclass(frozen=True, slots=True)
class GammaEstimate:
    alpha: float
    draft_ms_per_token: float
    network_ms: float
    verify_fixed_ms: float
    verify_per_token_ms: float


class GammaController:
    """Chooses γ in ``[1, gamma_max]``; a fixed γ when ``fixed`` is given."""

    def __init__(self, gamma_max: int, fixed: int | None = None, *, forgetting: float = 0.15,
                 prior_alpha: float = 0.7) -> None:
        if gamma_max < 1:
            raise ValueError("gamma_max must be >= 1")
        self.gamma_max = gamma_max
        self.fixed = None if fixed is None else max(1, min(fixed, gamma_max))
        self.forgetting = forgetting
        # Acceptance as discounted successes / trials of the geometric acceptance process.
        self._success = prior_alpha * 4.0
        self._trials = 4.0
        self._draft_ms = _Ema(8.0, forgetting)
        self._network_ms = _Ema(5.0, forgetting)
        # t_verify(γ) = fixed + per_token · (γ + 1), fitted by discounted least squares.
        self._sxx = self._sx = self._sy = self._sxy = self._n = 0.0
        self._verify_default = 60.0

    # -- observations ---------------------------------------------------------------------------
    def observe_round(self, *, drafted: int, accepted: int, draft_ms: float, network_ms: float,
                      verify_ms: float) -> None:
        decay = 1.0 - self.forgetting
        rejected = 1.0 if accepted < drafted else 0.0
        self._success = decay * self._success + accepted
        self._trials = decay * self._trials + accepted + rejected
        if drafted > 0 and draft_ms > 0:
            self._draft_ms.update(draft_ms / drafted)
        self._network_ms.update(max(0.0, network_ms))
        x, y = float(drafted + 1), max(0.0, verify_ms)
        self._sxx = decay * self._sxx + x * x
        self._sx = decay * self._sx + x
        self._sy = decay * self._sy + y
        self._sxy = decay * self._sxy + x * y
        self._n = decay * self._n + 1.0
        self._verify_default = y

    def observe_draft_time(self, ms_per_token: float) -> None:
        """A draft timing measured outside a round (e.g. tokens drafted ahead)."""
        if ms_per_token > 0:
            self._draft_ms.update(ms_per_token)

    # -- estimates ------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return min(0.99, max(0.01, self._success / self._trials)) if self._trials > 0 else 0.5

    def _verify_fit(self) -> tuple[float, float]:
        det = self._n * self._sxx - self._sx * self._sx
        if self._n < 2 or det <= 1e-9 * max(1.0, self._n * self._sxx):
            # One γ seen so far: most of a forward's cost is fixed (weights are read once per pass).
            mean = self._sy / self._n if self._n > 0 else self._verify_default
            return 0.8 * mean, 0.2 * mean / max(1.0, self._sx / self._n if self._n else 1.0)
        slope = (self._n * self._sxy - self._sx * self._sy) / det
        slope = max(0.0, slope)
        intercept = max(0.0, (self._sy - slope * self._sx) / self._n)
        return intercept, slope

    def estimate(self) -> GammaEstimate:
        fixed, per_token = self._verify_fit()
        return GammaEstimate(alpha=self.alpha, draft_ms_per_token=self._draft_ms.value,
                             network_ms=self._network_ms.value, verify_fixed_ms=fixed,
                             verify_per_token_ms=per_token)

    def round_ms(self, gamma: int, est: GammaEstimate | None = None) -> float:
        est = est or self.estimate()
        verify = est.verify_fixed_ms + est.verify_per_token_ms * (gamma + 1)
        return gamma * est.draft_ms_per_token + est.network_ms + verify

    def choose(self, remaining: int | None = None) -> int:
        """γ for the next round; never more drafts than tokens still wanted minus the bonus."""
        upper = self.gamma_max if remaining is None else max(1, min(self.gamma_max, remaining - 1))
        if self.fixed is not None:
            return min(self.fixed, upper)
        est = self.estimate()
        best, best_rate = 1, -1.0
        for gamma in range(1, upper + 1):
            rate = expected_tokens(est.alpha, gamma) / max(1e-6, self.round_ms(gamma, est))
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = gamma, rate
        return best
