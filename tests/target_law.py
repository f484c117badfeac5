"""The target's exact law of its first tokens, and χ² tests of sampled answers against it.

Speculative sampling is lossless when the emitted tokens follow the target's own law. That law is
known exactly for a tiny target: the distribution of token ``t`` given the tokens before it is one
forward pass. :func:`conditional_tests` compares, position by position, how often each token was
emitted with how often the target's conditionals say it should be:

- Samples are grouped into strata by the token before position ``t`` (the prompt's last token for
  ``t = 0``), so position 1 is the χ² test of the joint law of the first two tokens, and later
  positions test the target's conditionals after each common previous token.
- Within a stratum, the counts ``O[v]`` are compared with ``E[v] = Σ_i p(v | prefix_i)``. With
  samples ``i`` whose prefixes differ, ``O − E`` is a sum of martingale differences with covariance
  ``Σ_i diag(p_i) − p_i p_iᵀ``, so ``(O − E)ᵀ Σ⁺ (O − E)`` is χ² with ``rank Σ`` degrees of freedom
  (Pearson's statistic when all prefixes agree). Tokens expecting fewer than ``min_expected`` are
  pooled into one cell; strata with fewer than ``min_stratum`` samples are pooled into one stratum.
- Strata are independent given the past, so their statistics add up.
- A second test per position counts the emitted token's *rank* under its own conditional (most likely,
  second most likely, …) against the ranks' probabilities, the same way but in one stratum. It catches a
  token drawn from the wrong conditional (a bonus token from the wrong row), which the token test would
  need far more samples per stratum to see.
- Positions are asymptotically independent (martingale differences); the p-values of all tests are
  combined with a Bonferroni correction (:func:`bonferroni`).

An answer that ends early (end-of-sequence) simply stops contributing: later positions condition on
prefixes that continue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from specd.shared.sampling import SamplingParams, target_probs


class TargetLaw:
    """``p(· | prompt + prefix)`` of a causal LM under the user's sampling settings, cached per prefix."""

    def __init__(self, model: torch.nn.Module, prompt: Sequence[int], params: SamplingParams, *,
                 batch: int = 4096) -> None:
        self.model = model
        self.prompt = tuple(int(t) for t in prompt)
        self.params = params
        self.batch = batch
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.inference_mode()
    def next_probs(self, prefixes: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """The target's distribution after ``prompt + prefix`` for each prefix, float64 ``[n, V]``."""
        missing = sorted({p for p in prefixes if p not in self._cache}, key=len)
        by_length: dict[int, list[tuple[int, ...]]] = {}
        for prefix in missing:
            by_length.setdefault(len(prefix), []).append(prefix)
        for group in by_length.values():
            for start in range(0, len(group), self.batch):
                chunk = group[start:start + self.batch]
                seqs = torch.tensor([self.prompt + p for p in chunk])
                probs = target_probs(self.model(seqs).logits[:, -1], self.params).double()
                for prefix, row in zip(chunk, probs, strict=True):
                    self._cache[prefix] = row
        return torch.stack([self._cache[p] for p in prefixes])

    def first(self) -> torch.Tensor:
        return self.next_probs([()])[0]


@dataclass(frozen=True, slots=True)
class PositionTest:
    """One χ² test of one position (0 = the first token): of the emitted ``token`` per stratum, or of its
    ``rank`` under its conditional."""

    position: int
    kind: str  # "token" or "rank"
    statistic: float
    df: int
    pvalue: float
    samples: int


def conditional_tests(answers: Sequence[Sequence[int]], law: TargetLaw, positions: int, *,
                      eos: frozenset[int] = frozenset(), min_expected: float = 5.0,
                      min_stratum: int = 20) -> list[PositionTest]:
    """A token and a rank :class:`PositionTest` per position ``0 … positions − 1`` of ``answers`` (token
    ids after the prompt). Every answer must hold ``positions`` tokens unless it ended with ``eos``."""
    for answer in answers:
        if len(answer) < positions and (not answer or answer[-1] not in eos):
            raise AssertionError(f"an answer stopped after {len(answer)} of {positions} tokens without "
                                 f"end-of-sequence: {list(answer)}")
    results = []
    for t in range(positions):
        live = [a for a in answers if len(a) > t and not (set(a[:t]) & eos)]
        prefixes = [tuple(a[:t]) for a in live]
        probs = law.next_probs(prefixes).numpy()
        emitted = np.array([a[t] for a in live])
        previous = np.array([a[t - 1] if t else law.prompt[-1] for a in live])
        tests = {"token": _stratified_statistic(previous, emitted, probs, min_expected, min_stratum)}
        if t:  # at the first position every prefix is the prompt: ranks say what tokens say
            order = np.argsort(-probs, axis=1, kind="stable")
            rank_of = np.argsort(order, axis=1)[np.arange(len(live)), emitted]
            tests["rank"] = _generalised_pearson(rank_of, np.take_along_axis(probs, order, axis=1), min_expected)
        for kind, (statistic, df) in tests.items():
            pvalue = float(stats.chi2.sf(statistic, df)) if df else 1.0
            results.append(PositionTest(position=t, kind=kind, statistic=statistic, df=df, pvalue=pvalue,
                                        samples=len(live)))
    return results


def _stratified_statistic(strata: np.ndarray, emitted: np.ndarray, probs: np.ndarray, min_expected: float,
                          min_stratum: int) -> tuple[float, int]:
    keys, sizes = np.unique(strata, return_counts=True)
    small = set(keys[sizes < min_stratum].tolist())
    label = np.array([-1 if s in small else s for s in strata.tolist()])
    statistic, df = 0.0, 0
    for key in np.unique(label):
        member = label == key
        s, d = _generalised_pearson(emitted[member], probs[member], min_expected)
        statistic += s
        df += d
    return statistic, df


def _generalised_pearson(emitted: np.ndarray, probs: np.ndarray, min_expected: float) -> tuple[float, int]:
    """``(O − E)ᵀ Σ⁺ (O − E)`` over cells of tokens expecting ≥ ``min_expected`` plus one pooled cell."""
    expected = probs.sum(axis=0)
    big = np.flatnonzero(expected >= min_expected)
    cell_of = np.full(probs.shape[1], len(big))
    cell_of[big] = np.arange(len(big))
    cells = len(big) + 1
    cell_probs = np.zeros((probs.shape[0], cells))
    np.add.at(cell_probs.T, cell_of, probs.T)
    observed = np.bincount(cell_of[emitted], minlength=cells).astype(float)
    diff = observed - cell_probs.sum(axis=0)
    covariance = np.diag(cell_probs.sum(axis=0)) - cell_probs.T @ cell_probs
    values, vectors = np.linalg.eigh(covariance)
    keep = values > 1e-9 * max(1.0, float(values.max(initial=0.0)))
    projected = vectors[:, keep].T @ diff
    return float((projected ** 2 / values[keep]).sum()), int(keep.sum())


def bonferroni(pvalues: Sequence[float]) -> float:
    """The family's p-value: the smallest of ``m`` p-values times ``m`` (at most 1)."""
    return min(1.0, min(pvalues) * len(pvalues)) if pvalues else 1.0


def overlap(p: torch.Tensor, q: torch.Tensor) -> float:
    """``Σ min(p, q)``: the chance a draft sampled from q is accepted against p."""
    return float(torch.minimum(p.double(), q.double()).sum())
