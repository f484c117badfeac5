"""Adaptive draft length: pick γ each round to maximise expected tokens per second.

With per-token acceptance α, a round of γ drafts yields E(α, γ) = (1 − α^(γ+1)) / (1 − α) tokens and
costs γ·t_draft + R + t_verify(γ). Real acceptance is bursty — easy stretches are accepted whole, hard
ones fail at the first draft — so the i.i.d. formula misjudges long rounds (either way). The controller keeps
the acceptance rate of each draft position given that the ones before it were accepted (h_1, h_2, …,
shrunk towards the pooled α where a position has little evidence) and uses the general form
E(γ) = 1 + Σ_{i≤γ} Π_{j≤i} h_j, which is the formula above when every h_j = α. Every input is
estimated online from the rounds just seen (exponential forgetting), so γ follows the conversation:
long when the draft agrees with the target, short when it does not or when drafting is slow compared
to the round trip. It also says when drafting the next round ahead is worth it (see
:meth:`GammaController.worth_drafting_ahead`).

:class:`~specd.desktop.client.mode_chooser.ModeChooser` (its own module) puts the same estimates next
to the verifier's cloud-only streaming rate and picks, per round, the faster of a speculative round and
streaming; :class:`Step` and :class:`ModePolicy` here are the vocabulary the round loop shares with it.

Estimates must not mislead from the first round: every estimate starts from a prior worth a sample or
more (:class:`EstimatePriors`, seeded from the draft precision record when one exists), so a first
sample moves it rather than replacing it, and a *cold* round (an answer's first, which waited for the
verifier's prefill of the prompt) teaches acceptance and drafting time, not the round trip or the verify
time. Its drafting is timed warm: the round loop lets the drafter read the prompt before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

# A round's verdict counts as this many acceptance samples measured on streamed tokens (a round judges
# about as many drafts; one streamed sample alone would sway α as much as a whole round).
STREAMED_PER_ROUND = 4.0


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens emitted by one round of ``gamma`` drafts (accepted drafts plus one)."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


class ForgettingMean:
    """An exponentially forgetting mean that starts from a prior worth ``prior_samples`` samples: until
    the forgetting weight takes over, samples are averaged with the prior (the first of them weighs
    1/(1 + prior_samples), not 1), so one odd first measurement cannot set the estimate alone."""

    def __init__(self, value: float, weight: float, prior_samples: float = 1.0) -> None:
        self.value = value
        self.weight = weight
        self.prior_samples = prior_samples
        self.samples = 0
        self.seen = False

    def update(self, sample: float) -> None:
        self.samples += 1
        weight = max(self.weight, 1.0 / (self.samples + self.prior_samples))
        self.value = (1 - weight) * self.value + weight * sample
        self.seen = True


@dataclass(frozen=True, slots=True)
class EstimatePriors:
    """Where the estimates start before this client measured anything: built-in guesses, or what the
    draft precision record measured for this draft against this verifier (:meth:`from_record`)."""

    alpha: float = 0.7
    draft_ms_per_token: float = 8.0
    network_ms: float = 5.0
    verify_ms: float = 60.0  # one round of ``gamma`` drafts
    gamma: int = 1
    samples: float = 1.0  # how many measured samples the prior is worth
    source: str = "built-in"

    @classmethod
    def from_record(cls, record: dict) -> EstimatePriors | None:
        """The figures a precision record holds for the precision it chose; None when it has none."""
        chosen = next((c for c in record.get("candidates") or () if isinstance(c, dict)
                       and c.get("precision") == record.get("precision")), None)
        try:
            return cls(alpha=min(0.99, max(0.01, float(chosen["acceptance"]))),
                       draft_ms_per_token=max(0.0, float(chosen["draft_ms_per_token"])),
                       network_ms=max(0.0, float(chosen["network_ms"])), verify_ms=max(0.0, float(chosen["verify_ms"])),
                       gamma=max(1, int(chosen["gamma"])), samples=1.0, source="draft precision record")
        except (TypeError, KeyError, ValueError):
            return None


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
                 prior_alpha: float | None = None, priors: EstimatePriors | None = None) -> None:
        if gamma_max < 1:
            raise ValueError("gamma_max must be >= 1")
        priors = priors or EstimatePriors()
        if prior_alpha is not None:
            priors = replace(priors, alpha=prior_alpha)
        self.priors = priors
        self.gamma_max = gamma_max
        self.fixed = None if fixed is None else max(1, min(fixed, gamma_max))
        self.forgetting = forgetting
        # Acceptance as discounted successes / trials of the geometric acceptance process; the prior is
        # worth six trials, so one round rejected at its first draft cannot make drafting look hopeless.
        self._success = priors.alpha * 6.0
        self._trials = 6.0
        self._draft_ms = ForgettingMean(priors.draft_ms_per_token, forgetting, priors.samples)
        # The round trip is this connection's: the handshake's measured one replaces any prior outright.
        self._network_ms = ForgettingMean(priors.network_ms, forgetting, 0.0)
        # t_verify(γ) = fixed + per_token · (γ + 1), fitted by discounted least squares; a recorded
        # verify time enters as a pseudo-observation worth ``priors.samples`` rounds.
        self._sxx = self._sx = self._sy = self._sxy = self._n = 0.0
        self._verify_default = priors.verify_ms
        self._rounds = 0.0  # discounted count of the rounds observed (the pseudo-observation is not one)
        self.rounds_observed = 0  # every round observed, as a plain count (tells new evidence apart)
        if priors.source != "built-in":
            x, w = float(priors.gamma + 1), priors.samples
            self._sxx, self._sx, self._sy, self._sxy, self._n = w * x * x, w * x, w * priors.verify_ms, \
                w * x * priors.verify_ms, w
        # Per-position acceptance given the earlier drafts were accepted, discounted per observation.
        self._pos_success = [0.0] * gamma_max
        self._pos_trials = [0.0] * gamma_max
        # How often the draft's guess of the bonus token was right (for drafting ahead).
        self._guess_hits = priors.alpha
        self._guess_trials = 1.0
        # The γ the verifier's goodput budget suggested in its last verdict (0: none): drafts past it
        # would not be verified under its present load.
        self._server_gamma = 0
        # The verifier's decode step as it last stated it (welcome, verdicts; 0: never stated).
        self.server_step_ms = 0.0
        self.streamed_scored = 0  # streamed tokens the drafter scored (observe_streamed_acceptance), a count

    # -- observations ---------------------------------------------------------------------------
    def observe_round(self, *, drafted: int, accepted: int, draft_ms: float, network_ms: float,
                      verify_ms: float, cold: bool = False) -> None:
        """One verdict. ``cold``: the answer's first round, whose wait included the verifier's prefill of
        the prompt: acceptance and drafting time are learnt from it, the round trip and verify time are not."""
        decay = 1.0 - self.forgetting
        rejected = 1.0 if accepted < drafted else 0.0
        self._success = decay * self._success + accepted
        self._trials = decay * self._trials + accepted + rejected
        for i in range(min(drafted, accepted + 1, self.gamma_max)):  # positions that were judged
            self._pos_success[i] = decay * self._pos_success[i] + (1.0 if i < accepted else 0.0)
            self._pos_trials[i] = decay * self._pos_trials[i] + 1.0
        self._rounds = decay * self._rounds + 1.0
        self.rounds_observed += 1
        if drafted > 0 and draft_ms > 0:
            self._draft_ms.update(draft_ms / drafted)
        if cold:
            return
        self._network_ms.update(max(0.0, network_ms))
        x, y = float(drafted + 1), max(0.0, verify_ms)
        self._sxx = decay * self._sxx + x * x
        self._sx = decay * self._sx + x
        self._sy = decay * self._sy + y
        self._sxy = decay * self._sxy + x * y
        self._n = decay * self._n + 1.0
        self._verify_default = y

    def observe_streamed_acceptance(self, sample: float) -> None:
        """What a draft would have been accepted with at a token the verifier streamed: min(1, q/p) of the
        token it sampled (an unbiased sample of α, measured without a round; stream_scoring.py). A round's
        verdict weighs as much as ``STREAMED_PER_ROUND`` of them, and every position learns from it (the
        same α at every position is the prior's premise too)."""
        decay = (1.0 - self.forgetting) ** (1.0 / STREAMED_PER_ROUND)
        sample = min(1.0, max(0.0, sample))
        self._success = decay * self._success + sample
        self._trials = decay * self._trials + 1.0
        for i in range(self.gamma_max):
            self._pos_success[i] = decay * self._pos_success[i] + sample
            self._pos_trials[i] = decay * self._pos_trials[i] + 1.0
        self.streamed_scored += 1

    def observe_server_gamma(self, suggested: int) -> None:
        """The verdict's ``suggested_gamma``: an adaptive γ stays at most this until the next verdict."""
        self._server_gamma = max(0, suggested)

    def observe_server_step(self, step_ms: float) -> None:
        """The decode step the verifier stated (``decode_step_ms`` of its welcome and verdicts): its own
        forward cost model's prediction of one position for this session at its present load."""
        if step_ms > 0:
            self.server_step_ms = step_ms

    def observe_guess(self, hit: bool) -> None:
        """Whether the draft's guess of a round's bonus token (the premise of drafting ahead) was right."""
        decay = 1.0 - self.forgetting
        self._guess_hits = decay * self._guess_hits + (1.0 if hit else 0.0)
        self._guess_trials = decay * self._guess_trials + 1.0

    @property
    def guess_rate(self) -> float:
        """How often the guess a round drafted ahead was built on came true."""
        return self._guess_hits / self._guess_trials

    def observe_network(self, round_trip_ms: float) -> None:
        """A round trip timed outside a round: the handshake (hello → welcome), or a stream asked with
        nothing in flight (the wait for its first token, less that token's forward)."""
        self._network_ms.update(max(0.0, round_trip_ms))

    def observe_stall(self, round_trip_ms: float) -> None:
        """A stream ran dry before its top-up arrived, which came ``round_trip_ms`` (less its forward)
        after the ask: the round trip is at least that. A longer one replaces the estimate outright, since
        one too short stalls every top-up, and one too long only asks a few tokens more ahead."""
        if round_trip_ms > self._network_ms.value:
            self._network_ms.value = round_trip_ms
            self._network_ms.seen = True

    def observe_draft_time(self, ms_per_token: float) -> None:
        """A draft timing measured outside a round (e.g. tokens drafted ahead)."""
        if ms_per_token > 0:
            self._draft_ms.update(ms_per_token)

    # -- estimates ------------------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return min(0.99, max(0.01, self._success / self._trials)) if self._trials > 0 else 0.5

    def position_acceptance(self) -> list[float]:
        """h_i: the chance the i-th draft is accepted when the ones before it were."""
        alpha, weight = self.alpha, 3.0
        return [min(0.99, max(0.01, (s + alpha * weight) / (t + weight)))
                for s, t in zip(self._pos_success, self._pos_trials, strict=True)]

    def expected_tokens(self, gamma: int, h: list[float] | None = None) -> float:
        """Expected tokens from a round of ``gamma`` drafts (accepted drafts plus one)."""
        h = h or self.position_acceptance()
        total, survive = 1.0, 1.0
        for i in range(gamma):
            survive *= h[min(i, len(h) - 1)]
            total += survive
        return total

    def _verify_fit(self) -> tuple[float, float]:
        """t_verify(γ) = fixed + per_token·(γ+1) by discounted least squares, with the slope shrunk
        towards a prior: a forward's cost is mostly fixed (the weights are read once per pass), so the
        prior slope is a tenth of the mean cost per position, worth two rounds of evidence. Rounds of
        nearly one length cannot then produce a wild slope that locks γ at 1."""
        if self._n <= 0:
            mean_x, mean_y = 2.0, self._verify_default
        else:
            mean_x, mean_y = self._sx / self._n, self._sy / self._n
        prior_slope = 0.1 * mean_y / max(1.0, mean_x)
        spread = max(0.0, self._sxx - self._n * mean_x * mean_x)  # Σ w (x − x̄)²
        covariance = self._sxy - self._n * mean_x * mean_y  # Σ w (x − x̄)(y − ȳ)
        weight = 2.0
        slope = max(0.0, (covariance + weight * prior_slope) / (spread + weight))
        intercept = max(0.0, mean_y - slope * mean_x)
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

    @property
    def rounds_seen(self) -> float:
        """Discounted count of the rounds observed (0 before the first)."""
        return self._rounds

    def single_step_ms(self) -> float:
        """The verify cost of one position: the prior for the verifier's decode step."""
        fixed, per_token = self._verify_fit()
        return fixed + per_token

    def rate(self, gamma: int, *, optimistic: bool = False) -> float:
        """Expected tokens per millisecond of rounds of ``gamma`` drafts (every draft accepted when
        ``optimistic``)."""
        tokens = float(gamma + 1) if optimistic else self.expected_tokens(gamma)
        return tokens / max(1e-6, self.round_ms(gamma))

    def choose(self, remaining: int | None = None) -> int:
        """γ for the next round; never more drafts than tokens still wanted minus the bonus, and (unless γ
        is fixed) never more than the verifier last suggested."""
        upper = self.gamma_max if remaining is None else max(1, min(self.gamma_max, remaining - 1))
        if self.fixed is not None:
            return min(self.fixed, upper)
        if self._server_gamma:
            upper = max(1, min(upper, self._server_gamma))
        return self.fastest_gamma(upper, self.estimate())[0]

    def fastest_gamma(self, upper: int, est: GammaEstimate) -> tuple[int, float]:
        """The γ in ``[1, upper]`` with the most expected tokens per millisecond under ``est``, and that rate."""
        h = self.position_acceptance()
        best, best_rate = 1, -1.0
        for gamma in range(1, upper + 1):
            rate = self.expected_tokens(gamma, h) / max(1e-6, self.round_ms(gamma, est))
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = gamma, rate
        return best, best_rate

    def worth_drafting_ahead(self, gamma_now: int, gamma_next: int) -> bool:
        """Draft the next round during verification only when it pays on average.

        It is used when every draft in flight is accepted and the bonus guess is right (chance P); then
        it saves drafting the next round and a round trip. Otherwise it is thrown away, and the drafter
        first finishes the token it is on (about one draft step) before it can start the real round.
        """
        h = self.position_acceptance()
        p_all = 1.0
        for i in range(gamma_now):
            p_all *= h[min(i, len(h) - 1)]
        p_used = p_all * self.guess_rate
        est = self.estimate()
        saving = gamma_next * est.draft_ms_per_token + est.network_ms
        return p_used * saving > (1.0 - p_used) * est.draft_ms_per_token


# -- speculative rounds or cloud-only streaming ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class Step:
    """What to send next when nothing is in flight: a round, then (``stream`` > 0) that many tokens
    generated by the verifier alone; a round followed by a stream is a probe. The rates that decided it
    (tokens per second, None where a policy does not say) travel along for the answer's decision trace."""

    round: bool
    stream: int = 0
    speculative_tok_s: float | None = field(default=None, compare=False)
    streaming_tok_s: float | None = field(default=None, compare=False)
    gamma: int | None = field(default=None, compare=False)
    why: str = field(default="", compare=False)

    @property
    def mode(self) -> str:
        """``rounds``, ``streaming`` or ``probe`` (a round, then streaming at once)."""
        return ("probe" if self.stream else "rounds") if self.round else "streaming"


class ModePolicy(Protocol):
    """How an answer chooses between speculative rounds and streaming (``ModeChooser``, or a test's)."""

    def next_step(self, remaining: int) -> Step:
        """Nothing is in flight and ``remaining`` tokens are still wanted: what to send."""

    def top_up(self, remaining: int, owed: int) -> int:
        """While streaming, ``owed`` tokens are still coming: how many more to ask for (0: let it end)."""

    def observe_stream(self, tokens: int, forward_ms: float, gap_ms: float | None) -> None:
        """``tokens`` arrived, sampled in ``forward_ms``; ``gap_ms`` after the previous ones of a stream that
        did not run dry (None: the first of a stream)."""

    def scoring_share(self, remaining: int) -> float:
        """The share of the drafter's time to spend scoring streamed tokens for the estimates
        (stream_scoring.py); 0: none."""
