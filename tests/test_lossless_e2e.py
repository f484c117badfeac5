"""Sampled answers through the shipped edge client and verifier follow the target's law, and the same
harness rejects the two classic wrong rules (the short run; ``make lossless`` is the full one)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.lossless_harness import (
    EOS,
    PROMPT,
    TRIMS,
    VERIFIER_ROUND_RULE,
    Case,
    build_models,
    default_threads,
    run_case,
    sample_answers,
    trimmed_rounds,
)
from tests.lossless_run import (
    CONTEXT_AHEAD_CASE,
    CONTEXT_CASE,
    CONTROL_CASE,
    CONTROLS,
    LOOKAHEAD_CASE,
    SHORT,
    SHORT_CASES,
    SWITCHING_CASE,
    TRIMMED_CASE,
    context_prompt,
    drafted_ahead_with_lookups,
    look_ahead_always,
    model_drafts_on_the_lookups_guess,
    short_alpha,
)
from tests.mode_switches import switching_answer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    threads = torch.get_num_threads()
    default_threads()
    yield build_models(tmp_path_factory.mktemp("lossless"))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", SHORT_CASES, ids=lambda c: c.name)
async def test_answers_follow_the_targets_law(case, models):
    if case.backend == "onnxruntime-genai" and models.draft_ort is None:
        pytest.skip("onnxruntime-genai is not installed")
    result = await run_case(replace(case, answers=SHORT["case"]), models)
    print(result.summary())  # shown with -s
    kinds = result.sample.kinds
    assert kinds["accepted"] and kinds["corrected"] and kinds["bonus"], result.summary()
    if case.pipeline:
        assert kinds["ahead rounds"] > 0, f"no round was drafted ahead: {result.summary()}"
    assert 0.3 < result.overlap < 0.8, result.summary()
    assert result.pvalue > short_alpha(), f"the answers differ from the target's law: {result.summary()}"


async def test_answers_that_switch_modes_follow_the_targets_law(models):
    """Rounds and stretches the verifier streams alone, switching both ways at seeded points."""
    result = await run_case(replace(SWITCHING_CASE, answers=SHORT["case"]), models, drive=switching_answer)
    print(result.summary())  # shown with -s
    kinds = result.sample.kinds
    assert kinds["streamed"] and kinds["accepted"] and kinds["corrected"] and kinds["bonus"], result.summary()
    assert result.pvalue > short_alpha(), f"the answers differ from the target's law: {result.summary()}"


async def test_answers_whose_rounds_the_budget_trims_follow_the_targets_law(models):
    """Four concurrent sessions; the verifier's budget verifies a random prefix of every round (0 … γ)."""
    result = await run_case(replace(TRIMMED_CASE, answers=SHORT["case"]), models)
    print(result.summary(), dict(TRIMS))  # shown with -s
    assert TRIMS["rounds trimmed"] > 100 and TRIMS["rounds to one step"] > 50, dict(TRIMS)
    kinds = result.sample.kinds
    assert kinds["accepted"] and kinds["corrected"] and kinds["bonus"], result.summary()
    assert result.pvalue > short_alpha(), f"the answers differ from the target's law: {result.summary()}"


async def test_rounds_from_the_context_proposer_follow_the_targets_law(models):
    """Drafts looked up in the conversation (q = 1 on each): looked-up rounds, sent ahead too, and rounds
    where the model continues the lookup."""
    case = replace(CONTEXT_CASE, answers=SHORT["case"], prompt=context_prompt(models))
    with look_ahead_always():
        result = await run_case(case, models)
    print(result.summary())  # shown with -s
    kinds = result.sample.kinds
    # The planner picks lookups by measured speed, so how many it sends varies with the machine (392 of
    # 1,141 drafts in 200 answers in one CI run): ask for one per answer on average, and model drafts too.
    assert kinds["looked-up drafts"] >= SHORT["case"] and kinds["model drafts"], result.summary()
    assert kinds["ahead rounds"] > SHORT["case"] // 10, result.summary()
    assert kinds["accepted"] and kinds["corrected"] and kinds["bonus"], result.summary()
    assert result.pvalue > short_alpha(), f"the answers differ from the target's law: {result.summary()}"


async def test_rounds_drafted_ahead_that_start_with_looked_up_drafts_follow_the_targets_law(models):
    """Rounds drafted ahead whose guess the lookup shares: its tokens first, then the model's (or none)."""
    case = replace(CONTEXT_AHEAD_CASE, answers=SHORT["case"], prompt=context_prompt(models))
    with drafted_ahead_with_lookups() as sent:
        result = await run_case(case, models)
    print(result.summary(), dict(sent))  # shown with -s
    assert sent["drafted ahead, looked-up first"] > SHORT["case"] // 10, (result.summary(), dict(sent))
    assert sent["drafted ahead, looked-up then model"] > 0, (result.summary(), dict(sent))
    kinds = result.sample.kinds
    assert kinds["accepted"] and kinds["corrected"] and kinds["bonus"], result.summary()
    assert result.pvalue > short_alpha(), f"the answers differ from the target's law: {result.summary()}"


async def test_model_drafts_read_from_a_forward_fed_the_lookups_guess_follow_the_targets_law(models):
    """The model drafting on the lookup's guess: the drafts that equal it come from the logits of one
    forward over the guess (drafted ahead too), not one forward each. The draft is the target's own model
    here (as in the product's embedded pair, a draft that agrees with the target), so its drafts equal the
    lookup's tokens, the target's likely continuation, often."""
    case = replace(LOOKAHEAD_CASE, answers=SHORT["case"], prompt=context_prompt(models))
    with model_drafts_on_the_lookups_guess() as planned:
        result = await run_case(case, replace(models, draft=models.target))
    print(result.summary(), dict(planned))  # shown with -s
    kinds = result.sample.kinds
    assert planned["model drafts on the lookup's guess"] > SHORT["case"] // 2, (result.summary(), dict(planned))
    assert kinds["looked-ahead drafts"] >= SHORT["case"] // 20, result.summary()  # 24 of 200 answers in one run
    assert kinds["accepted"] and kinds["corrected"] and kinds["bonus"], result.summary()
    assert result.pvalue > short_alpha(), f"the answers differ from the target's law: {result.summary()}"


async def test_greedy_answers_whose_rounds_the_budget_trims_are_the_targets_own(models):
    from transformers import AutoModelForCausalLM

    from specd.shared.sampling import SamplingParams
    from tests.lossless_harness import in_process_verifier

    case = Case("greedy, trimmed", SamplingParams(temperature=0.0), gamma=4, tokens=12, sessions=4, answers=16,
                trimmed=True, first_seed=9 * 10**6)
    target = AutoModelForCausalLM.from_pretrained(str(models.target), dtype=torch.float32).eval()
    with torch.inference_mode():
        out = target.generate(torch.tensor([PROMPT]), max_new_tokens=case.tokens, do_sample=False,
                              eos_token_id=sorted(EOS), pad_token_id=sorted(EOS)[0])
    expected = out[0, len(PROMPT):].tolist()
    with trimmed_rounds(case.first_seed):
        async with in_process_verifier(models.target) as url:
            sample = await sample_answers(url, models, case)
    assert all(answer == expected for answer in sample.answers), (expected, sample.answers[:3])
    assert TRIMS["rounds trimmed"] > 10 and TRIMS["rounds to one step"] > 5, dict(TRIMS)


@pytest.mark.parametrize("rule", list(CONTROLS.values()), ids=list(CONTROLS))
async def test_a_wrong_rule_in_the_verifier_is_rejected(rule, models):
    result = await run_case(replace(CONTROL_CASE, answers=SHORT["control"]), models, rule=rule)
    print(result.summary())  # shown with -s
    assert result.sample.kinds["bonus"] and result.sample.kinds["corrected"], result.summary()
    assert result.pvalue < short_alpha(), (f"the harness missed a wrong rule (does the verifier still judge "
                                           f"rounds through {VERIFIER_ROUND_RULE}?): {result.summary()}")
