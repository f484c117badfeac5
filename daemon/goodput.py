"""The goodput budget: how many of each ready round's drafts one forward verifies.

A forward over many drafted positions costs more than one over a position per session, and past some
load it costs more than the tokens it yields. So before each rounds forward the engine chooses a
*width* ``w`` for it: every round in it verifies ``min(γ, w − 1)`` of its drafts (a prefix: a round
with γ' drafts, lossless; ``w = 1`` is one cloud step per session). The engine pads every row of a
forward to the widest one, so the forward costs ``rows × w`` positions whatever each row holds: given
``w``, verifying fewer drafts in some row saves nothing, and one width per forward is the whole
choice. It is the one that maximises expected committed tokens per second of the forward:

    goodput(w) = Σ_rows E_i(min(γ_i, w − 1)) / T(rows, w)

``E_i(k) = 1 + Σ_{j ≤ k} Π_{l ≤ j} h_l`` from the session's measured acceptance ``h_l`` of the l-th draft
given the earlier ones were accepted (:class:`Acceptance`), and ``T`` from :class:`ForwardCost`, an
online least-squares model of the engine's own forward seconds against rows and positions, measured on
the device it runs on (a calibration at start, then every forward).

The same choice with every session offering ``ceiling`` drafts gives the γ the verdict suggests for the
next round (``suggested_gamma``): what this load would verify, so a client need not draft more.
Nothing here touches a model or a clock: the engine hands in what it measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Acceptance before a session's first rounds are seen (SmolLM2 pairs measure 0.4–0.9), worth this many rounds.
PRIOR_ACCEPTANCE = 0.6
PRIOR_WEIGHT = 2.0
# Older rounds count less: a session's acceptance moves with what it writes.
ACCEPTANCE_FORGETTING = 0.1
# Forward timings: older ones count less (load and context length drift); the calibration is worth this
# many forwards and decays with them.
COST_FORGETTING = 0.02
CALIBRATION_WEIGHT = 8.0
# A narrower forward is chosen only when it beats the wider ones by this much.
MARGIN = 0.02


@dataclass(slots=True)
class Acceptance:
    """A session's acceptance per draft position, from the rounds the verifier judged (discounted)."""

    positions: int = 16
    _success: list[float] = field(default_factory=list)
    _trials: list[float] = field(default_factory=list)
    _all_success: float = PRIOR_ACCEPTANCE * PRIOR_WEIGHT
    _all_trials: float = PRIOR_WEIGHT

    def __post_init__(self) -> None:
        self._success = [0.0] * self.positions
        self._trials = [0.0] * self.positions

    def observe(self, verified: int, accepted: int) -> None:
        """A round verified ``verified`` drafts and accepted the first ``accepted``; drafts past the first
        rejection were not judged and count for nothing."""
        decay = 1.0 - ACCEPTANCE_FORGETTING
        judged = min(verified, accepted + 1)
        self._all_success = decay * self._all_success + accepted
        self._all_trials = decay * self._all_trials + judged
        for i in range(min(judged, self.positions)):
            self._success[i] = decay * self._success[i] + (1.0 if i < accepted else 0.0)
            self._trials[i] = decay * self._trials[i] + 1.0

    @property
    def overall(self) -> float:
        return min(0.99, max(0.01, self._all_success / self._all_trials))

    def conditional(self, count: int) -> list[float]:
        """``h_1 … h_count``: each position's own rate, shrunk towards the overall one (positions seen
        rarely, and those never offered, take the overall rate)."""
        alpha = self.overall
        out = []
        for i in range(count):
            s, t = (self._success[i], self._trials[i]) if i < self.positions else (0.0, 0.0)
            out.append(min(0.99, max(0.01, (s + alpha * PRIOR_WEIGHT) / (t + PRIOR_WEIGHT))))
        return out


def expected_tokens(h: Sequence[float], drafts: int) -> float:
    """Expected committed tokens of a round verifying ``drafts`` drafts: accepted drafts plus one."""
    total, survive = 1.0, 1.0
    for rate in h[:drafts]:
        survive *= rate
        total += survive
    return total


class ForwardCost:
    """Seconds of one forward ≈ ``a + b·rows + c·rows·width``, by discounted least squares with a ridge
    towards the calibration's fit (so forwards of one shape cannot bend the other coefficients)."""

    FEATURES = 3

    def __init__(self) -> None:
        n = self.FEATURES
        self._xx = [[0.0] * n for _ in range(n)]
        self._xy = [0.0] * n
        self._prior: list[float] | None = None
        self._coef: list[float] | None = None
        self.observations = 0

    @staticmethod
    def _features(rows: int, width: int) -> list[float]:
        return [1.0, float(rows), float(rows * width)]

    @property
    def calibrated(self) -> bool:
        return self._prior is not None

    def calibrate(self, samples: Sequence[tuple[int, int, float]]) -> None:
        """Fit ``(rows, width, seconds)`` forwards of chosen shapes; the fit is the ridge's anchor."""
        xx = [[0.0] * self.FEATURES for _ in range(self.FEATURES)]
        xy = [0.0] * self.FEATURES
        for rows, width, seconds in samples:
            _accumulate(xx, xy, self._features(rows, width), seconds, 1.0)
        for i in range(self.FEATURES):
            xx[i][i] += 1e-9
        self._prior = [max(0.0, c) for c in _solve(xx, xy)]
        for rows, width, seconds in samples:
            _accumulate(self._xx, self._xy, self._features(rows, width), seconds, CALIBRATION_WEIGHT / len(samples))
        self._coef = None

    def observe(self, rows: int, width: int, seconds: float) -> None:
        decay = 1.0 - COST_FORGETTING
        for i in range(self.FEATURES):
            self._xy[i] *= decay
            for j in range(self.FEATURES):
                self._xx[i][j] *= decay
        _accumulate(self._xx, self._xy, self._features(rows, width), seconds, 1.0)
        self.observations += 1
        self._coef = None

    def coefficients(self) -> list[float]:
        if self._coef is None:
            prior = self._prior or [0.0, 0.0, 1.0]  # uncalibrated: cost in proportion to positions
            xx = [row[:] for row in self._xx]
            xy = self._xy[:]
            for i in range(self.FEATURES):  # a light ridge: collinear forwards leave the anchor's value
                weight = 1e-2 * xx[i][i] + 1e-12
                xx[i][i] += weight
                xy[i] += weight * prior[i]
            self._coef = [max(0.0, c) for c in _solve(xx, xy)]
        return self._coef

    def seconds(self, rows: int, width: int) -> float:
        a, b, c = self.coefficients()
        return max(1e-9, a + b * rows + c * rows * width)


def _accumulate(xx: list[list[float]], xy: list[float], x: list[float], y: float, weight: float) -> None:
    for i, xi in enumerate(x):
        xy[i] += weight * xi * y
        for j, xj in enumerate(x):
            xx[i][j] += weight * xi * xj


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (a 3×3 system); a singular column gets 0."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            continue
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col and m[r][col] != 0.0:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
    return [m[i][n] / m[i][i] if abs(m[i][i]) >= 1e-300 else 0.0 for i in range(n)]


@dataclass(frozen=True, slots=True)
class Offer:
    """One ready round: ``drafts`` offered, and the session's acceptance ``h`` for at least that many."""

    drafts: int
    h: Sequence[float]


@dataclass(frozen=True, slots=True)
class Choice:
    width: int  # positions per row: 1 + drafts verified (at most)
    rows: int  # how many of the offers (oldest first) the forward takes
    goodput: float  # expected tokens per second

    def verified(self, offer: Offer) -> int:
        return min(offer.drafts, self.width - 1)


def choose(offers: Sequence[Offer], cost: ForwardCost, *, max_rows: int, max_positions: int,
           idle_s: float = 0.0) -> Choice:
    """The width (and so the rows, under ``max_positions`` per forward) with the most expected tokens per
    second of the verifier's time: the forward, plus ``idle_s``, the time the verifier then waits for
    rounds (measured; about 0 under load). So a lone session, whose client drafts while the verifier
    idles, has all its drafts verified, and trimming starts where forwards queue. A narrower forward
    must beat the wider ones by ``MARGIN``: noise in the timings does not trim."""
    if not offers:
        raise ValueError("no rounds to choose for")
    # cumulative[i][k]: expected tokens of offer i verifying k drafts.
    cumulative = []
    for offer in offers:
        row, survive = [1.0], 1.0
        for rate in offer.h[:offer.drafts]:
            survive *= rate
            row.append(row[-1] + survive)
        cumulative.append(row)
    widest = max(len(row) for row in cumulative)
    best: Choice | None = None
    for width in range(widest, 0, -1):
        rows = max(1, min(len(offers), max_rows, max_positions // width))
        tokens = sum(row[min(len(row), width) - 1] for row in cumulative[:rows])
        rate = tokens / (cost.seconds(rows, width) + idle_s)
        if best is None or rate > best.goodput * (1 + MARGIN):
            best = Choice(width=width, rows=rows, goodput=rate)
    assert best is not None
    return best


def suggested_gamma(offers: Sequence[Offer], cost: ForwardCost, *, ceiling: int, max_rows: int,
                    max_positions: int, idle_s: float = 0.0) -> int:
    """The γ this load would verify if every session offered ``ceiling`` drafts (each offer's ``h`` covers
    that many), at least 1: a round needs a draft."""
    extended = [Offer(drafts=ceiling, h=o.h) for o in offers]
    return max(1, choose(extended, cost, max_rows=max_rows, max_positions=max_positions, idle_s=idle_s).width - 1)
