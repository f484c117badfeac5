"""Bench figures from answers' statistics: α estimation, the theoretical tokens per forward, speedup,
assessment, the worst cell against cloud-only; the default RTT grid; the prompt set; transformers' assisted
generation on tiny models."""

from __future__ import annotations

import random

import pytest

from specd.desktop.bench.figures import (
    RunRecord,
    assessment,
    expected_tokens_per_round,
    per_token_alpha,
    product_mode,
    summarise,
    worst_cell_line,
    worst_cells,
)
from specd.desktop.bench.prompts import CATEGORIES, PROMPTS, select_prompts
from specd.desktop.client.answer import AnswerStats


def test_prompt_set_covers_four_categories_early():
    assert len(PROMPTS) == 10 and len(CATEGORIES) == 4
    assert {p.category for p in select_prompts(4)} == set(CATEGORIES)
    assert len({p.id for p in PROMPTS}) == 10
    for bad in (0, 11):
        with pytest.raises(ValueError):
            select_prompts(bad)


def test_assessment_thresholds_of_the_original_runner():
    assert [assessment(a) for a in (0.51, 0.5, 0.31, 0.3, 0.11, 0.1, 0.0)] == [
        "EXCELLENT", "GOOD", "GOOD", "MODERATE", "MODERATE", "POOR", "POOR"]


def test_expected_tokens_per_round():
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert expected_tokens_per_round(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)


def _simulate(alpha: float, gammas: list[int], seed: int = 0) -> AnswerStats:
    """Rounds where each draft is accepted with probability α until the first rejection."""
    rng = random.Random(seed)
    stats = AnswerStats()
    for gamma in gammas:
        accepted = 0
        while accepted < gamma and rng.random() < alpha:
            accepted += 1
        stats.on_round_verdict(gamma, accepted, verify_ms=0.0, network_ms=None)
        stats.generated += accepted + 1
    return stats


@pytest.mark.parametrize("alpha", [0.3, 0.8])
def test_alpha_is_recovered_and_tokens_per_forward_match_theory(alpha):
    fixed = _simulate(alpha, [4] * 4000)
    est = per_token_alpha(fixed.accepted_by_position, fixed.drafted_by_position)
    assert est == pytest.approx(alpha, abs=0.02)
    assert fixed.tokens_per_forward == pytest.approx(expected_tokens_per_round(alpha, 4), rel=0.03)
    # accepted ÷ drafted (the runner's acceptance rate) is lower than α: drafts after a rejection count too
    assert fixed.acceptance_rate < est
    varying = _simulate(alpha, [random.Random(i).randint(1, 8) for i in range(4000)], seed=1)
    est = per_token_alpha(varying.accepted_by_position, varying.drafted_by_position)
    assert est == pytest.approx(alpha, abs=0.05)


def _record(mode: str, rtt: float, generated: int, total_ms: float, prompt: str = "p", tokens=None) -> RunRecord:
    stats = _simulate(0.7, [3] * 5) if mode.startswith("spec") else AnswerStats()
    stats.generated, stats.total_ms = generated, total_ms
    if mode == "cloud-only":
        stats.target_forwards = generated
    return RunRecord(device="-" if mode == "cloud-only" else "cpu", rtt_ms=rtt, mode=mode, prompt_id=prompt,
                     category="c", iteration=0, seed=1, stats=stats.to_json(),
                     token_ids=tokens or list(range(generated)), finish_reason="length")


def test_speedup_is_against_cloud_only_at_the_same_rtt():
    records = [_record("cloud-only", 0, 10, 1000), _record("spec-fixed", 0, 10, 500),
               _record("cloud-only", 50, 10, 2000), _record("spec-fixed", 50, 10, 400, tokens=[9] * 10),
               _record("edge-only", 50, 20, 1000)]
    out = summarise(records)
    assert list(out) == ["cpu"]
    assert out["cpu"]["0"]["spec-fixed"]["speedup"] == pytest.approx(2.0)
    assert out["cpu"]["50"]["spec-fixed"]["speedup"] == pytest.approx(5.0)
    assert out["cpu"]["50"]["edge-only"]["speedup"] == pytest.approx(4.0)
    assert out["cpu"]["0"]["cloud-only"]["speedup"] == pytest.approx(1.0)
    assert out["cpu"]["0"]["spec-fixed"]["same_tokens_as_cloud_only"] == 1.0
    assert out["cpu"]["50"]["spec-fixed"]["same_tokens_as_cloud_only"] == 0.0
    assert out["cpu"]["0"]["spec-fixed"]["gamma_mean"] == 3.0
    assert out["cpu"]["0"]["spec-fixed"]["assessment"] in ("EXCELLENT", "GOOD", "MODERATE", "POOR")
    assert out["cpu"]["0"]["cloud-only"]["assessment"] is None


def _grid() -> list[RunRecord]:
    """cloud-only at 10 tok/s everywhere; spec-pipelined 2× at 0 ms falling to 0.97× at 200 ms, spec-fixed
    worst at 100 ms."""
    records = []
    for rtt, pipelined_ms, fixed_ms in ((0, 500, 800), (50, 700, 900), (100, 800, 1250), (200, 1031, 1100)):
        records += [_record("cloud-only", rtt, 10, 1000), _record("spec-pipelined", rtt, 10, pipelined_ms),
                    _record("spec-fixed", rtt, 10, fixed_ms), _record("edge-only", rtt, 10, 5000)]
    return records


def test_the_worst_cell_of_each_speculative_mode():
    worst = worst_cells(summarise(_grid()))
    assert list(worst) == ["spec-fixed", "spec-pipelined"]  # edge-only is not speculation
    assert worst["spec-pipelined"]["rtt_ms"] == 200.0 and worst["spec-pipelined"]["device"] == "cpu"
    assert worst["spec-pipelined"]["speedup"] == pytest.approx(1000 / 1031)
    assert worst["spec-fixed"]["rtt_ms"] == 100.0 and worst["spec-fixed"]["speedup"] == pytest.approx(0.8)
    line = worst_cell_line(worst, "spec-pipelined")
    assert line == ("Worst cell: spec-pipelined 0.97× cloud-only (cpu @ +200 ms); other modes' worst: "
                    "spec-fixed 0.80× cloud-only (cpu @ +100 ms)")
    assert worst_cell_line({}, "spec-pipelined") == ""


def test_the_worst_cell_is_in_the_report_json_markdown_and_summary_for_the_mode_the_config_runs():
    from specd.desktop.bench.cli import summary
    from specd.desktop.bench.report import build_report, markdown
    from specd.desktop.bench.runner import BenchResult
    from specd.shared.config import Config, to_dict

    assert product_mode(to_dict(Config())["speculation"]) == "spec-pipelined"
    assert product_mode({"gamma": "auto", "pipeline": False}) == "spec-adaptive"
    assert product_mode({"gamma": 4, "pipeline": True}) == "spec-fixed"
    report = build_report(BenchResult(records=_grid()), {"config": to_dict(Config())})
    assert report["worst_cell"] == {"mode": "spec-pipelined", "device": "cpu", "rtt_ms": 200.0,
                                    "speedup": pytest.approx(1000 / 1031)}
    assert set(report["worst_cell_by_mode"]) == {"spec-fixed", "spec-pipelined"}
    assert "Worst cell: spec-pipelined 0.97× cloud-only (cpu @ +200 ms)" in summary(report).splitlines()[-1]
    assert "**Worst cell: spec-pipelined 0.97×" in markdown(report)


def test_the_default_rtt_grid_reaches_200_ms():
    from specd.desktop.bench.cli import DEFAULT_RTTS_MS, bench_rtts
    from specd.desktop.cli import build_parser

    parse = build_parser().parse_args
    assert bench_rtts(parse(["bench"])) == DEFAULT_RTTS_MS == (0.0, 20.0, 50.0, 100.0, 200.0)
    assert bench_rtts(parse(["bench", "--rtt-ms", "0", "35"])) == (0.0, 35.0)


def test_transformers_assisted_generation_on_tiny_models(tmp_path):
    from specd.desktop.bench.hf_assisted import measure
    from tests.tiny_models import save_tiny_model

    target = save_tiny_model(tmp_path / "target", seed=1)
    draft = save_tiny_model(tmp_path / "draft", seed=2)
    for assistant in (draft, target):  # a separate torch draft, and the int8 copy of the target
        result = measure(str(target), str(assistant), prompts=1, max_new_tokens=6, temperature=0.0, top_p=1.0,
                         seed=1, threads=1)
        # Greedy assisted generation is lossless: it emits the tokens plain generation does.
        assert result["assisted_tokens"] == result["plain_tokens"] > 0
        plain_rate, assisted_rate = (result[f"{k}_tokens"] / result[f"{k}_s"] for k in ("plain", "assisted"))
        assert result["plain_tokens_per_second"] == pytest.approx(plain_rate)
        assert result["assisted_speedup"] == pytest.approx(assisted_rate / plain_rate)
    assert "int8" in result["assistant"] and result["note"]


def test_the_mode_decisions_are_counted_and_the_first_switch_to_streaming_is_in_the_report():
    from specd.desktop.bench.report import build_report, markdown
    from specd.desktop.bench.runner import BenchResult

    switched = _record("spec-pipelined", 200, 64, 4000)
    switched.stats.update(cloud_tokens=40, mode_switches=[
        {"at_token": 0, "to": "rounds", "speculative_tok_s": 16.0, "streaming_tok_s": 12.0, "gamma": 8, "why": ""},
        {"at_token": 24, "to": "streaming", "speculative_tok_s": 9.5, "streaming_tok_s": 14.2, "gamma": 3,
         "why": "streaming is faster"},
        {"at_token": 40, "to": "probe", "speculative_tok_s": 9.5, "streaming_tok_s": 14.2, "gamma": 3, "why": ""}])
    records = [_record("cloud-only", 200, 64, 5000), switched]
    cell = summarise(records)["cpu"]["200"]["spec-pipelined"]
    assert (cell["streamed_tokens"], cell["probes"], cell["switches_to_streaming"]) == (40, 1, 1)
    assert summarise(records)["cpu"]["200"]["cloud-only"]["streamed_tokens"] == 0
    text = markdown(build_report(BenchResult(records=records), {}))
    assert "## Mode decisions" in text
    assert "| cpu | 200 | spec-pipelined | 40 of 64 | 1 | 1 | p #1 at token 24: 9.5 vs 14.2 tok/s (γ 3) |" in text
