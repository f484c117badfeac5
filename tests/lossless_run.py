"""The cases of the end-to-end χ² harness (tests/lossless_harness.py), and its full-size run.

    python -m tests.lossless_run                                # every case at full size, with power
    python -m tests.lossless_run --scale 0.25 --power-repeats 3 # a quicker look
    make lossless                                               # the full run, report in benchmarks/

``make test`` runs the short version (tests/test_lossless_e2e.py): :data:`SHORT` answers per case.
The full run samples :data:`FULL` answers per case, also through a ``specd-verifier`` subprocess, runs
the two negative controls at full size, and repeats each negative control ``--power-repeats`` times at
the short size with fresh seeds: the fraction rejected is the short test's power against that bug.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from unittest import mock

from specd.shared.sampling import SamplingParams
from tests.lossless_harness import (
    EOS,
    PROMPT,
    Case,
    CaseResult,
    Models,
    build_models,
    default_threads,
    in_process_verifier,
    run_case,
    speculative_answer,
    subprocess_verifier,
)
from tests.mode_switches import switching_answer
from tests.wrong_rules import bonus_from_the_last_drafts_row, lower_only_p_of_d

# Family-wise false alarm rate of the short run: a correct build fails it at most this often. Each
# positive case gets an equal share (Bonferroni); a negative control must fall below the same share.
FAMILY_ALPHA = 1e-3

# Pipelined cases need γ = 2 and 6 tokens: with fewer, the client never finds drafting ahead worth it.
CASES = [
    Case("temperature-1, pipelined", SamplingParams(temperature=1.0), gamma=2, tokens=6, sessions=4),
    Case("temperature-0.7, top-k 8, ONNX Runtime GenAI", SamplingParams(temperature=0.7, top_k=8), gamma=3,
         tokens=5, pipeline=False, backend="onnxruntime-genai", first_seed=10**6),
    Case("top-p 0.8, pipelined", SamplingParams(temperature=1.0, top_p=0.8), gamma=2, tokens=6, sessions=4,
         first_seed=2 * 10**6),
    Case("temperature-1, not pipelined", SamplingParams(temperature=1.0), gamma=2, tokens=4, pipeline=False,
         first_seed=3 * 10**6),
    Case("all filters, support 8", SamplingParams(temperature=0.8, top_k=20, top_p=0.9), gamma=2, tokens=4,
         support_k=8, pipeline=False, first_seed=4 * 10**6),
]
SHORT_CASES = CASES[:3]
# Answers that switch between rounds and the verifier streaming alone, at seeded points (tests/mode_switches.py).
SWITCHING_CASE = Case("temperature-1, switching modes", SamplingParams(temperature=1.0), gamma=2, tokens=6,
                      first_seed=7 * 10**6)
# Drafts looked up in the conversation. The prompt holds the target's own likely continuation of PROMPT
# and then PROMPT again (:func:`context_prompt`), so the lookup proposes tokens the target often accepts:
# looked-up rounds, looked-up rounds sent ahead (every time the lookup has one: ``look_ahead_always``),
# and rounds where the lookup runs out and the model continues it (mixed).
CONTEXT_CASE = Case("temperature-1, context proposer", SamplingParams(temperature=1.0), gamma=3, tokens=6,
                    context_proposer=True, first_seed=10 * 10**6)
# The same, every round drafted ahead on the lookup's guess (:func:`drafted_ahead_with_lookups`).
CONTEXT_AHEAD_CASE = replace(CONTEXT_CASE, name="temperature-1, context proposer, drafted ahead", tokens=8,
                             first_seed=11 * 10**6)
# The same, the model drafting on the lookup's guess every other round (:func:`model_drafts_on_the_lookups_guess`).
LOOKAHEAD_CASE = replace(CONTEXT_CASE, name="temperature-1, model drafts on the lookup's guess",
                         first_seed=12 * 10**6)


def context_prompt(models: Models, length: int = 4) -> tuple[int, ...]:
    """``PROMPT``, the target's greedy continuation of it (``length`` tokens), then ``PROMPT`` again."""
    import torch
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(str(models.target), dtype=torch.float32).eval()
    with torch.inference_mode():
        out = target.generate(torch.tensor([PROMPT]), max_new_tokens=length, do_sample=False,
                              eos_token_id=sorted(EOS), pad_token_id=sorted(EOS)[0])
    return (*PROMPT, *out[0, len(PROMPT):].tolist(), *PROMPT)


@contextlib.contextmanager
def look_ahead_always() -> Iterator[None]:
    """Send a looked-up round ahead whenever the lookup has one (the client otherwise waits until looked-up
    drafts are accepted often enough), so the χ² cases see many."""
    with mock.patch("specd.desktop.client.round_planner.AHEAD_WORTH", 0.0):
        yield


@contextlib.contextmanager
def drafted_ahead_with_lookups() -> Iterator[Counter]:
    """Draft every round ahead in the drafter thread (never a looked-up round sent ahead without drafting),
    on the lookup's guess wherever it has one, so the χ² cases see rounds drafted ahead that start with
    looked-up tokens, continued by the model (every other one, cut to one looked-up token) or not. Yields a
    count of those rounds, as sent."""
    from specd.desktop.client.drafting_ahead import DraftingAhead
    from specd.desktop.client.round_planner import AheadPlan, RoundPlanner

    sent: Counter = Counter()
    finish = DraftingAhead.finish

    async def counted(job: DraftingAhead, link, run):
        round_sent = await finish(job, link, run)
        if round_sent is not None and job.plan.lookup:
            sent["drafted ahead, looked-up first"] += 1
            sent["drafted ahead, looked-up then model"] += bool(job.plan.model_gamma)
        return round_sent

    plan_ahead = RoundPlanner.plan_ahead

    def trusted(planner: RoundPlanner, *args, **kwargs) -> AheadPlan | None:
        ahead = plan_ahead(planner, *args, **kwargs)
        if ahead is None:
            return None
        plan = ahead.plan
        sent["planned"] += 1
        if sent["planned"] % 2 and len(plan.lookup) > 1:  # every other round: one looked up, the model after
            plan = replace(plan, lookup=plan.lookup[:1], model_gamma=plan.gamma - 1)
        return replace(ahead, plan=plan, trusted=True)

    with mock.patch.object(RoundPlanner, "look_ahead", return_value=None), \
            mock.patch.object(RoundPlanner, "plan_ahead", trusted), \
            mock.patch("specd.desktop.client.adaptive.GammaController.worth_drafting_ahead", return_value=True), \
            mock.patch.object(DraftingAhead, "finish", counted):
        yield sent


@contextlib.contextmanager
def model_drafts_on_the_lookups_guess() -> Iterator[Counter]:
    """Every other round the lookup has tokens for, drafted by the model alone (drafted ahead or not), with
    the lookup fed as its guess wherever it has one (``lookahead.py``, whatever its measured acceptance), so
    the χ² cases see model drafts read from the logits of a forward over several tokens. Yields a count of
    the rounds so planned."""
    from specd.desktop.client.round_planner import RoundPlan, RoundPlanner

    planned: Counter = Counter()

    def model_only(plan: RoundPlan) -> RoundPlan:
        planned["plans with a lookup"] += bool(plan.found)
        if not plan.found or planned["plans with a lookup"] % 2:
            return plan
        planned["model drafts on the lookup's guess"] += 1
        return replace(plan, lookup=(), model_gamma=plan.gamma)

    plan, plan_ahead = RoundPlanner.plan, RoundPlanner.plan_ahead

    def planned_model_only(planner: RoundPlanner, *args, **kwargs) -> RoundPlan:
        return model_only(plan(planner, *args, **kwargs))

    def planned_ahead_model_only(planner: RoundPlanner, *args, **kwargs):
        ahead = plan_ahead(planner, *args, **kwargs)
        return None if ahead is None else replace(ahead, plan=model_only(ahead.plan))

    with mock.patch.object(RoundPlanner, "plan", planned_model_only), \
            mock.patch.object(RoundPlanner, "plan_ahead", planned_ahead_model_only), \
            mock.patch("specd.desktop.client.lookahead.LOOKAHEAD_WORTH", 0.0):
        yield planned


SUBPROCESS_CASE = Case("temperature-1, specd-verifier subprocess", SamplingParams(temperature=1.0), gamma=2,
                       tokens=4, pipeline=False, first_seed=5 * 10**6)
# Concurrent sessions whose rounds the verifier's goodput budget trims to a random prefix (0 … γ drafts).
TRIMMED_CASE = Case("temperature-1, rounds trimmed by the budget", SamplingParams(temperature=1.0), gamma=3,
                    tokens=6, sessions=4, trimmed=True, first_seed=8 * 10**6)
CONTROL_CASE = Case("negative control", SamplingParams(temperature=1.0), gamma=2, tokens=4, pipeline=False,
                    first_seed=6 * 10**6)
CONTROLS = {"wrong residual (only p(d) lowered)": lower_only_p_of_d,
            "bonus from the wrong row (p_γ)": bonus_from_the_last_drafts_row}
SHORT = {"case": 200, "control": 400}
FULL = {"case": 2000, "control": 1000}


def short_alpha() -> float:
    """The level each case of the short run is tested at (the short cases, the switching, the trimmed and the
    two context ones)."""
    return FAMILY_ALPHA / (len(SHORT_CASES) + 4)


async def run_all(models: Models, scale: float, power_repeats: int, say) -> dict:
    full = {k: max(50, int(v * scale)) for k, v in FULL.items()}
    out: dict = {"cases": [], "controls": [], "power": {}}
    for case in [*CASES, SWITCHING_CASE, TRIMMED_CASE, CONTEXT_CASE, SUBPROCESS_CASE]:
        verifier = subprocess_verifier if case is SUBPROCESS_CASE else in_process_verifier
        drive = switching_answer if case is SWITCHING_CASE else speculative_answer
        if case is CONTEXT_CASE:
            case = replace(case, prompt=context_prompt(models))
        with look_ahead_always():
            result = await run_case(replace(case, answers=full["case"]), models, verifier=verifier, drive=drive)
        say(result.summary())
        out["cases"].append(result)
    with drafted_ahead_with_lookups():
        result = await run_case(replace(CONTEXT_AHEAD_CASE, prompt=context_prompt(models), answers=full["case"]),
                                models)
    say(result.summary())
    out["cases"].append(result)
    for name, rule in CONTROLS.items():
        result = await run_case(replace(CONTROL_CASE, name=name, answers=full["control"]), models, rule=rule)
        say(result.summary())
        out["controls"].append(result)
        pvalues = []
        for r in range(power_repeats):
            short = replace(CONTROL_CASE, name=f"{name}, short #{r + 1}", answers=SHORT["control"],
                            first_seed=CONTROL_CASE.first_seed + (r + 1) * 10**5)
            result = await run_case(short, models, rule=rule)
            say(result.summary())
            pvalues.append(result.pvalue)
        out["power"][name] = pvalues
    return out


def _row(result: CaseResult) -> str:
    k = result.sample.kinds
    worst = min(result.positions, key=lambda t: t.pvalue)
    streamed = f", {k['streamed']} streamed" if k["streamed"] else ""
    return (f"| {result.case.name}{streamed} | {len(result.sample.answers)} | γ {result.case.gamma}, "
            f"{result.case.tokens} "
            f"tokens, {result.case.sessions} sessions | {result.overlap:.2f} | {result.pvalue:.3g} | "
            f"{worst.pvalue:.3g} (t{worst.position} {worst.kind}) | {k['accepted']} / {k['corrected']} / "
            f"{k['bonus']} / {k['ahead rounds']} | {result.sample.answers_per_second:.1f} |")


def report(out: dict, command: str, seconds: float) -> str:
    header = ("| case | answers | shape | overlap | p (Bonferroni) | smallest test p | accepted / corrected / "
              "bonus tokens / rounds drafted ahead | answers/s |\n|---|---|---|---|---|---|---|---|")
    lines = [
        "# Losslessness through the product: end-to-end χ²", "",
        f"Command: `{command}` — {seconds / 60:.1f} min on {platform.machine()} "
        f"({platform.python_version()}).", "",
        "Each answer runs through a real `EdgeClient` (torch or ONNX Runtime GenAI drafter) and a real verifier "
        "on 127.0.0.1; every position is tested against the tiny target's exact conditionals "
        "(tests/target_law.py: a token test per stratum of the previous token and a rank test), combined per "
        "case with a Bonferroni correction. A correct build gives p-values spread over (0, 1].", "",
        "## The shipped rule", "", header, *(_row(r) for r in out["cases"]), "",
        "## Negative controls (must be rejected)", "", header, *(_row(r) for r in out["controls"]), "",
        f"Power of the short run (`make test`: {SHORT['control']} answers, rejected when p < "
        f"{short_alpha():.2g}), over fresh seeds:", "",
        *(f"- {name}: rejected {sum(p < short_alpha() for p in ps)} of {len(ps)} "
          f"(p = {', '.join(f'{p:.2g}' for p in ps)})" for name, ps in out["power"].items()), "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lossless_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="answers per case, relative to the full size")
    parser.add_argument("--power-repeats", type=int, default=4,
                        help="short-size runs of each negative control, to measure the short test's power")
    parser.add_argument("--report", metavar="PATH", help="write the Markdown report here")
    args = parser.parse_args(argv)
    default_threads()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="specd-lossless-") as root:
        models = build_models(Path(root))
        out = asyncio.run(run_all(models, args.scale, args.power_repeats, lambda line: print(line, flush=True)))
    text = report(out, "python -m tests.lossless_run " + " ".join(argv if argv is not None else sys.argv[1:]),
                  time.perf_counter() - start)
    print(text)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text, encoding="utf-8")
    failed = [r.case.name for r in out["cases"] if r.pvalue < FAMILY_ALPHA / len(out["cases"])]
    missed = [r.case.name for r in out["controls"] if r.pvalue >= FAMILY_ALPHA]
    for name in failed:
        print(f"FAILED: {name} differs from the target's law", file=sys.stderr)
    for name in missed:
        print(f"FAILED: the negative control {name} was not rejected", file=sys.stderr)
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
