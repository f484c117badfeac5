"""χ² proof that speculative sampling emits exactly the target's distribution, and that the test
has the power to catch a wrong rule.

Every configuration emits γ + 2 tokens per request, so accepted drafts, corrections and bonus tokens
(token γ + 1) are all tested; each position is tested against the target's exact conditionals
(tests/target_law.py). Each configuration runs with two seeds, and all p-values share one family-wise
false alarm rate (Bonferroni), so a correct implementation fails about once in a thousand changes of
random-number consumption, not once in seven.
"""

from __future__ import annotations

import pytest
import torch

from specd.shared.sampling import SamplingParams, sparse_proposal, target_probs, verify_round
from tests.speculative_sim import speculative_first_tokens
from tests.target_law import TargetLaw, bonferroni, conditional_tests, overlap
from tests.tiny_models import perturbed_llama, tiny_llama
from tests.wrong_rules import bonus_from_the_last_drafts_row, correction_from_p, lower_only_p_of_d

PROMPT = [1, 17, 42, 9]
SAMPLES = 6000
SEEDS = (1234, 4321)
FAMILY_ALPHA = 1e-3
VOCAB = 64
EOS = frozenset({2})

CONFIGS = {
    "temperature-1": dict(params=SamplingParams(temperature=1.0), gamma=4, support_k=VOCAB),
    "temperature-0.7": dict(params=SamplingParams(temperature=0.7), gamma=4, support_k=VOCAB),
    "top-k": dict(params=SamplingParams(temperature=1.0, top_k=10), gamma=4, support_k=VOCAB),
    "top-p": dict(params=SamplingParams(temperature=1.0, top_p=0.8), gamma=4, support_k=VOCAB),
    "gamma-1": dict(params=SamplingParams(temperature=1.0), gamma=1, support_k=VOCAB),
    "gamma-8": dict(params=SamplingParams(temperature=1.0), gamma=8, support_k=VOCAB),
    "support-8": dict(params=SamplingParams(temperature=1.0), gamma=4, support_k=8),
    "all-filters-support-4": dict(params=SamplingParams(temperature=0.7, top_k=20, top_p=0.9), gamma=3,
                                  support_k=4),
}
# Each (configuration, seed) is tested at an equal share of the family's rate; a negative control must
# be rejected at the same level.
RUN_ALPHA = FAMILY_ALPHA / (len(CONFIGS) * len(SEEDS))


@pytest.fixture(scope="module")
def target():
    """A sharp tiny target (its wrong-rule biases stand out of the sampling noise)."""
    return tiny_llama(seed=1, sharpness=12.0)


@pytest.fixture(scope="module")
def draft(target):
    """The target plus noise: first-draft acceptance 0.37–0.69 across the configurations."""
    return perturbed_llama(target, scale=0.3, seed=7)


@pytest.fixture(scope="module")
def law(target):
    laws: dict[SamplingParams, TargetLaw] = {}

    def get(params: SamplingParams) -> TargetLaw:
        if params not in laws:
            laws[params] = TargetLaw(target, PROMPT, params)
        return laws[params]

    return get


def _pvalue(target, draft, law, *, params, gamma, support_k, seed, verify=verify_round) -> tuple[float, list]:
    tokens = speculative_first_tokens(target, draft, PROMPT, k=gamma + 2, gamma=gamma, params=params,
                                      support_k=support_k, samples=SAMPLES, seed=seed, verify=verify)
    tests = conditional_tests(tokens.tolist(), law(params), gamma + 2, eos=EOS)
    return bonferroni([t.pvalue for t in tests]), tests


@pytest.mark.parametrize("name", list(CONFIGS))
def test_draft_and_target_overlap_in_every_configuration(name, target, draft, law):
    """The tests below only mean something if drafts are often accepted and often rejected."""
    config = CONFIGS[name]
    with torch.no_grad():
        logits = draft(torch.tensor([PROMPT])).logits[:, -1]
    proposal = sparse_proposal(logits, config["params"], config["support_k"])
    q = torch.zeros(VOCAB).scatter_(0, proposal.ids[0], proposal.probs[0])
    p = law(config["params"]).first()
    assert 0.3 < overlap(p, q) < 0.8
    with torch.no_grad():  # and the draft is a different model, not the target under another name
        assert overlap(target_probs(target(torch.tensor([PROMPT])).logits[0, -1], SamplingParams()),
                       target_probs(logits[0], SamplingParams())) < 0.8


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_speculative_sampling_matches_target(name, seed, target, draft, law):
    pvalue, tests = _pvalue(target, draft, law, seed=seed, **CONFIGS[name])
    print(f"{name}, seed {seed}: p = {pvalue:.3g} (Bonferroni over {len(tests)} tests)")  # shown with -s
    assert pvalue > RUN_ALPHA, f"{name}: the tokens differ from the target's (p={pvalue:.2e}): {tests}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("wrong_rule", [lower_only_p_of_d, correction_from_p, bonus_from_the_last_drafts_row])
def test_the_chi_square_test_catches_a_wrong_rule(wrong_rule, seed, target, draft, law):
    pvalue, tests = _pvalue(target, draft, law, verify=wrong_rule, seed=seed, **CONFIGS["temperature-1"])
    print(f"{wrong_rule.__name__}, seed {seed}: p = {pvalue:.3g}")  # shown with -s
    assert pvalue < RUN_ALPHA, f"the χ² test missed {wrong_rule.__name__} (p={pvalue:.2e}): {tests}"
