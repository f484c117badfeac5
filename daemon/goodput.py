"""The goodput budget: how many of each ready round's drafts one forward verifies.

A forward over many drafted positions costs more than one over a position per session, and past some
load it costs more than the tokens it yields. So before each rounds forward the engine chooses a
*width* ``w`` for it: every round in it verifies ``min(γ, w − 1)`` of its drafts (a prefix: a round
with γ' drafts, lossless; ``w = 1`` is one cloud step per session). The engine pads every row of a
forward to the widest one, so the forward costs ``rows × w`` positions whatever each row holds: given
``w``, verifying fewer drafts in some row saves nothing, and one width per forward is the whole
choice. It is the one that maximises expected committed tokens per second of the forward:

    goodput(w) = Σ_rows E_i(min(γ_i, w − 1)) / T(rows, w)

over every ready round: where ``max_positions`` fits fewer of them than are ready at width ``w``, the
rest wait for the forwards after it, and their time counts (a width that leaves 8 of 64 rounds for a
forward of their own pays for that forward's fixed part again).

``E_i(k) = 1 + Σ_{j ≤ k} Π_{l ≤ j} h_l`` from the session's measured acceptance ``h_l`` of the l-th draft
given the earlier ones were accepted (:class:`Acceptance`), and ``T`` from :class:`ForwardCost`, an
online least-squares model of the engine's own forward seconds against rows and positions, measured on
the device it runs on (its shape timed at start, its level followed on every forward).

The same choice with every session offering ``ceiling`` drafts gives the γ the verdict suggests for the
next round (``suggested_gamma``): what this load would verify, so a client need not draft more.
Nothing here touches a model or a clock: the engine hands in what it measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

# Acceptance before a session's first rounds are seen (SmolLM2 pairs measure 0.4–0.9), worth this many rounds.
PRIOR_ACCEPTANCE = 0.6
PRIOR_WEIGHT = 2.0
# Older rounds count less: a session's acceptance moves with what it writes. The population of all
# sessions receives every session's rounds, so it forgets per round far more slowly.
ACCEPTANCE_FORGETTING = 0.1
POPULATION_FORGETTING = 0.01
# Weight of each forward's measured ÷ predicted seconds in the cost model's level, and in its correction
# of the shape at that forward's width and rows.
COST_FORGETTING = 0.1
SHAPE_FORGETTING = 0.2
# A narrower forward is chosen only when it beats the wider ones by this much.
MARGIN = 0.02
# Drafts are verified only where that beats one cloud step per session by this much: the cost model is a
# few per cent off between runs on a CPU, and that error must not make speculation cost more than
# cloud-only where the two are near (a weak draft at high load).
CLOUD_MARGIN = 0.05
# A session none of whose drafts were judged for this many rounds in a row has one verified in a later
# round, as EXPLORE_SHARE allows, and in each round after while those are accepted: its acceptance is
# otherwise never measured again, so drafts that got better (a copy, looked up in the conversation) would
# be trimmed for good.
EXPLORE_AFTER = 8
# Exploring pads the whole forward to width 2 where width 1 was chosen, so every session in it pays: the
# engine spends on it at most this share of its forwards' (predicted) time, banked up to a few forwards'
# worth (EXPLORE_BURST), so a session whose drafts became right is explored several rounds in a row.
EXPLORE_SHARE = 0.02
EXPLORE_BURST = 4


@dataclass(slots=True)
class Acceptance:
    """A session's acceptance per draft position, from the rounds the verifier judged (discounted).

    With a ``population`` (every session's rounds pooled, :meth:`pooled`), a new session starts from the
    population's acceptance instead of a fixed guess, and a position this session has rarely had judged
    takes the population's rate at that position, scaled by how this session compares overall: the
    shape across positions is a property of the pair and the text (acceptance often rises once a run of
    drafts has held), which a session of a dozen rounds cannot measure at its deeper positions alone.
    """

    positions: int = 16
    population: Acceptance | None = None
    forgetting: float = ACCEPTANCE_FORGETTING
    _success: list[float] = field(default_factory=list)
    _trials: list[float] = field(default_factory=list)
    _all_success: float = PRIOR_ACCEPTANCE * PRIOR_WEIGHT
    _all_trials: float = PRIOR_WEIGHT
    _unjudged: int = 0  # rounds in a row of which no draft was verified
    # conditional(count) since the last round, kept where it rests on this object's rounds alone (a pool's
    # is asked by every session of a forward); one with a population follows the population's rounds too
    _computed: dict[int, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._success = [0.0] * self.positions
        self._trials = [0.0] * self.positions
        if self.population is not None:
            self._all_success = self.population.overall * PRIOR_WEIGHT

    @classmethod
    def pooled(cls, positions: int = 16) -> Acceptance:
        """The population of an engine's sessions: forgets slowly, since every session's rounds arrive."""
        return cls(positions=positions, forgetting=POPULATION_FORGETTING)

    def observe(self, verified: int, accepted: int) -> None:
        """A round verified ``verified`` drafts and accepted the first ``accepted``; drafts past the first
        rejection were not judged and count for nothing."""
        decay = 1.0 - self.forgetting
        judged = min(verified, accepted + 1)
        if verified == 0:
            self._unjudged += 1
        elif not (self.starved and accepted >= verified):  # a right draft explored: explore the next round too
            self._unjudged = 0
        self._all_success = decay * self._all_success + accepted
        self._all_trials = decay * self._all_trials + judged
        for i in range(min(judged, self.positions)):
            self._success[i] = decay * self._success[i] + (1.0 if i < accepted else 0.0)
            self._trials[i] = decay * self._trials[i] + 1.0
        self._computed.clear()
        if self.population is not None:
            self.population.observe(verified, accepted)

    @property
    def starved(self) -> bool:
        """No draft of this session was judged for ``EXPLORE_AFTER`` rounds, or the ones verified since
        were all accepted: verify one, to measure again."""
        return self._unjudged >= EXPLORE_AFTER

    @property
    def overall(self) -> float:
        return min(0.99, max(0.01, self._all_success / self._all_trials))

    def conditional(self, count: int) -> list[float]:
        """``h_1 … h_count``: each position's own rate, shrunk towards a prior for that position (positions
        seen rarely, and those never offered, take the prior): the population's rate there scaled by this
        session's overall ÷ the population's, or without a population this session's overall rate."""
        if count in self._computed:
            return self._computed[count]
        alpha = self.overall
        if self.population is not None:
            shape = self.population.conditional(count)
            level = alpha / self.population.overall
            priors = [min(0.99, max(0.01, rate * level)) for rate in shape]
        else:
            priors = [alpha] * count
        out = []
        for i in range(count):
            s, t = (self._success[i], self._trials[i]) if i < self.positions else (0.0, 0.0)
            out.append(min(0.99, max(0.01, (s + priors[i] * PRIOR_WEIGHT) / (t + PRIOR_WEIGHT))))
        if self.population is None:
            self._computed[count] = out
        return out


def expected_tokens(h: Sequence[float], drafts: int) -> float:
    """Expected committed tokens of a round verifying ``drafts`` drafts: accepted drafts plus one."""
    total, survive = 1.0, 1.0
    for rate in h[:drafts]:
        survive *= rate
        total += survive
    return total


class ForwardCost:
    """Seconds of one forward of ``rows`` sessions padded to ``width`` positions each.

    The *shape* comes from timing forwards on the device (:meth:`calibrate`): for each number of rows
    timed, a line in the width (``a_R + b_R·width``), and between those rows a linear blend. Every forward
    the engine runs then corrects it (:meth:`observe`): the *level*, a discounted ratio of measured to
    predicted seconds over all forwards, so a machine that slows down (another process, a hotter GPU)
    moves every prediction alike; and, per width and nearest timed rows, a discounted correction of the
    shape relative to that level, so the forwards the engine really runs (their context, their rows)
    replace the calibration's guess where they have been seen.
    """

    def __init__(self) -> None:
        self._lines: dict[int, tuple[float, float]] = {}  # rows -> (a, b)
        self.scale = 1.0
        self._shape_fix: dict[tuple[int, int], float] = {}  # (nearest timed rows, width) -> measured / level
        self.observations = 0

    @property
    def calibrated(self) -> bool:
        return bool(self._lines)

    def calibrate(self, samples: Sequence[tuple[int, int, float]]) -> None:
        """Fit ``(rows, width, seconds)`` timings: a least-squares line in the width for each rows."""
        by_rows: dict[int, list[tuple[int, float]]] = {}
        for rows, width, seconds in samples:
            by_rows.setdefault(rows, []).append((width, seconds))
        lines = {}
        for rows, points in by_rows.items():
            n = len(points)
            mean_w = sum(w for w, _ in points) / n
            mean_t = sum(t for _, t in points) / n
            spread = sum((w - mean_w) ** 2 for w, _ in points)
            slope = max(0.0, sum((w - mean_w) * (t - mean_t) for w, t in points) / spread) if spread else 0.0
            lines[rows] = (max(1e-9, mean_t - slope * mean_w), slope)
        self._lines = dict(sorted(lines.items()))
        self.scale = 1.0

    def _shape(self, rows: int, width: int) -> float:
        if not self._lines:
            return float(rows * width)  # uncalibrated: in proportion to positions
        known = list(self._lines)

        def at(r: int) -> float:
            a, b = self._lines[r]
            return a + b * width

        if rows <= known[0]:
            return at(known[0]) * (rows / known[0] if len(known) > 1 and rows < known[0] else 1.0)
        if rows >= known[-1]:
            return at(known[-1]) * rows / known[-1]
        hi = next(r for r in known if r >= rows)
        lo = known[known.index(hi) - 1]
        return at(lo) + (at(hi) - at(lo)) * (rows - lo) / (hi - lo)

    def _bucket(self, rows: int) -> int:
        if not self._lines:
            return rows
        return min(self._lines, key=lambda r: abs(math.log(r) - math.log(max(rows, 1))))

    def observe(self, rows: int, width: int, seconds: float) -> None:
        """A forward the engine ran: the level follows the measured ÷ predicted ratio, and the shape's
        correction at this width and rows follows the measured ÷ levelled prediction."""
        shape = self._shape(rows, width)
        if shape <= 0 or seconds <= 0:
            return
        key = (self._bucket(rows), width)
        fix = self._shape_fix.get(key, self._fix(rows, width))
        self.scale += COST_FORGETTING * (seconds / (shape * fix) - self.scale)
        self._shape_fix[key] = fix + SHAPE_FORGETTING * (seconds / (shape * self.scale) - fix)
        self.observations += 1

    def _fix(self, rows: int, width: int) -> float:
        """The shape's correction at ``width``: measured where forwards of that width ran, else blended
        linearly between the nearest widths measured on either side (the nearest one past the ends), so a
        width not yet run is judged on the same footing as its neighbours."""
        bucket = self._bucket(rows)
        seen = sorted((w, f) for (b, w), f in self._shape_fix.items() if b == bucket)
        if not seen:
            return 1.0
        below = [(w, f) for w, f in seen if w <= width]
        above = [(w, f) for w, f in seen if w >= width]
        if not below:
            return above[0][1]
        if not above:
            return below[-1][1]
        (w0, f0), (w1, f1) = below[-1], above[0]
        return f0 if w1 == w0 else f0 + (f1 - f0) * (width - w0) / (w1 - w0)

    def seconds(self, rows: int, width: int) -> float:
        return max(1e-9, self.scale * self._fix(rows, width) * self._shape(rows, width))

    def describe(self) -> str:
        return "; ".join(f"{rows} row(s): {a * 1e3:.2f} ms + {b * 1e3:.3f} ms per position of width"
                         for rows, (a, b) in self._lines.items())


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
    second of the verifier's time over every offer: the forwards the offers need at that width, plus
    ``idle_s``, the time the verifier then waits for rounds (measured; about 0 under load). So a lone
    session, whose client drafts while the verifier idles, has all its drafts verified, and trimming
    starts where forwards queue. A narrower forward must beat the wider ones by ``MARGIN``: noise in the
    timings does not trim; but any width must beat one cloud step per session (width 1) by
    ``CLOUD_MARGIN``: in doubt, speculation costs what cloud-only does."""
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
        per_forward = max(1, min(max_rows, max_positions // width))
        rows = min(len(offers), per_forward)
        tokens = sum(row[min(len(row), width) - 1] for row in cumulative)
        seconds, left = idle_s, len(offers)
        while left > 0:  # the rounds this forward leaves wait for the next one(s), of the same width
            seconds += cost.seconds(min(left, per_forward), width)
            left -= per_forward
        rate = tokens / seconds
        if best is None or rate > best.goodput * (1 + MARGIN):
            best = Choice(width=width, rows=rows, goodput=rate)
        if width == 1 and best.width > 1 and best.goodput < rate * (1 + CLOUD_MARGIN):
            best = Choice(width=1, rows=rows, goodput=rate)
    assert best is not None
    return best


def suggested_gamma(offers: Sequence[Offer], cost: ForwardCost, *, ceiling: int, max_rows: int,
                    max_positions: int, idle_s: float = 0.0) -> int:
    """The γ this load would verify if every session offered ``ceiling`` drafts (each offer's ``h`` covers
    that many), at least 1: a round needs a draft."""
    extended = [Offer(drafts=ceiling, h=o.h) for o in offers]
    return max(1, choose(extended, cost, max_rows=max_rows, max_positions=max_positions, idle_s=idle_s).width - 1)
