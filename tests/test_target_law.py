"""The χ² statistic of tests/target_law.py: it accepts the target's own samples and rejects another
model's, so the losslessness tests built on it can pass and can fail."""

from __future__ import annotations

import pytest
import torch

from specd.shared.sampling import SamplingParams
from tests.target_law import TargetLaw, bonferroni, conditional_tests
from tests.tiny_models import perturbed_llama, tiny_llama

PROMPT = (1, 17, 42, 9)
POSITIONS = 4
SAMPLES = 3000
PARAMS = SamplingParams(temperature=1.0, top_k=20)


def ancestral(law: TargetLaw, samples: int, seed: int) -> list[list[int]]:
    """``samples`` answers drawn token by token from ``law`` itself."""
    generator = torch.Generator().manual_seed(seed)
    answers: list[list[int]] = [[] for _ in range(samples)]
    for _ in range(POSITIONS):
        probs = law.next_probs([tuple(a) for a in answers])
        for answer, token in zip(answers, torch.multinomial(probs, 1, generator=generator)[:, 0].tolist(),
                                 strict=True):
            answer.append(token)
    return answers


def test_the_targets_own_samples_pass_and_another_models_fail():
    target = tiny_llama(seed=1, sharpness=12.0)
    law = TargetLaw(target, PROMPT, PARAMS)
    own = conditional_tests(ancestral(law, SAMPLES, seed=5), law, POSITIONS)
    other = conditional_tests(ancestral(TargetLaw(perturbed_llama(target, 0.3, seed=7), PROMPT, PARAMS),
                                        SAMPLES, seed=5), law, POSITIONS)
    assert [t.kind for t in own] == ["token", "token", "rank", "token", "rank", "token", "rank"]
    assert all(t.df > 0 and t.samples == SAMPLES for t in own)
    assert bonferroni([t.pvalue for t in own]) > 1e-3, own
    assert bonferroni([t.pvalue for t in other]) < 1e-9, other


def test_answers_that_end_early_stop_counting_and_others_must_be_complete():
    law = TargetLaw(tiny_llama(seed=1), PROMPT, PARAMS)
    tests = conditional_tests([[5, 2], [5, 6, 7, 8]], law, POSITIONS, eos=frozenset({2}))
    assert [t.samples for t in tests if t.kind == "token"] == [2, 2, 1, 1]
    with pytest.raises(AssertionError, match="stopped after 2 of 4 tokens without end-of-sequence"):
        conditional_tests([[5, 6]], law, POSITIONS, eos=frozenset({2}))
