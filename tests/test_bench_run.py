"""``specd bench`` end to end on tiny models: a real verifier on 127.0.0.1, the delaying proxy in the path,
every mode, two RTTs, concurrent sessions; then the JSON, the Markdown report and the plots."""

from __future__ import annotations

import json
import statistics

import pytest

from specd.daemon.server import Verifier
from specd.desktop.bench.cli import bench_async, run_bench
from specd.desktop.bench.figures import DEFAULT_MODES as MODES
from specd.desktop.bench.figures import SPEC_MODES as ALL_SPEC_MODES
from specd.desktop.bench.figures import assessment, expected_tokens_per_round
from specd.desktop.bench.prompts import COPY_PROMPTS
from specd.desktop.cli import build_parser
from specd.shared.config import load_config
from tests.tiny_models import save_tiny_model

SPEC_MODES = tuple(m for m in ALL_SPEC_MODES if m in MODES)  # what a plain `specd bench` runs


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    target = save_tiny_model(root / "target", seed=1)
    draft = save_tiny_model(root / "draft", seed=2)
    path = root / "config.toml"
    path.write_text(f'[models]\ntarget = "{target}"\ndraft = "{draft}"\ndraft_backend = "torch"\n'
                    '[devices]\nedge_device = "cpu"\n'
                    # The figures of rounds are checked on rounds: the tiny verifier streams faster than any.
                    '[speculation]\nmode_switching = false\n', encoding="utf-8")
    return path


def parse(*argv: str):
    return build_parser().parse_args(["bench", *argv])


async def test_bench_measures_every_mode_and_writes_the_report(config_file, tmp_path):
    # Whole rounds (no goodput budget): the spec-fixed cells below reproduce each other round for round.
    verifier_cfg = load_config(config_file, overrides={"server": {"port": 0}, "limits": {"goodput_budget": False}})
    out = tmp_path / "out"
    async with Verifier(verifier_cfg) as verifier:
        args = parse("--config", str(config_file), "--host", "127.0.0.1", "--port", str(verifier.port),
                     "--num-prompts", "1", "--iterations", "1", "--max-new-tokens", "12", "--temperature", "0",
                     "--rtt-ms", "0", "40", "--sessions", "1", "2", "--gamma", "3", "--no-hf-assisted",
                     "--out", str(out), "--title", "tiny")
        assert await bench_async(args) == 0
    report = json.loads((out / "bench.json").read_text())
    # the contract: top-level speedup and acceptance per mode, and one key per mode
    assert set(report["speedup"]) == set(MODES)
    assert report["speedup"]["cloud-only"] == pytest.approx(1.0)
    assert set(report["acceptance"]) == set(SPEC_MODES)
    for mode in MODES:
        assert report[mode]["answers"] == 1
        assert report[mode]["generated_tokens"] > 0
    runs = {(r["mode"], r["rtt_ms"]): r for r in report["runs"]}
    for mode in SPEC_MODES:
        fig, stats = report[mode], runs[(mode, 0.0)]["stats"]
        assert stats["drafted"] > 0
        assert fig["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["drafted"])
        assert report["acceptance"][mode] == fig["acceptance_rate"]
        # Greedy: what is accepted does not depend on the network, only on the two models.
        assert runs[(mode, 40.0)]["token_ids"] == runs[(mode, 0.0)]["token_ids"]
        assert fig["assessment"] == assessment(fig["acceptance_rate"])
        assert fig["target_forwards"] == stats["rounds"] == stats["target_forwards"] >= 1
        assert fig["tokens_per_forward"] == pytest.approx(stats["generated"] / stats["rounds"])
        assert fig["theoretical_tokens_per_forward"] == pytest.approx(
            statistics.fmean(expected_tokens_per_round(fig["alpha"], g) for g in stats["gammas"]))
        assert fig["bytes_per_token"] == pytest.approx(
            (stats["bytes_sent"] + stats["bytes_received"]) / stats["generated"])
        assert fig["same_tokens_as_cloud_only"] == 1.0  # greedy: speculative output is the target's
    fixed = [runs[("spec-fixed", rtt)]["stats"] for rtt in (0.0, 40.0)]
    assert fixed[0]["accepted"] == fixed[1]["accepted"] and fixed[0]["drafted"] == fixed[1]["drafted"]
    fixed_gammas = [g for r in report["runs"] if r["mode"] == "spec-fixed" for g in r["stats"]["gammas"]]
    assert fixed_gammas and max(fixed_gammas) <= 3  # γ = 3, less only where fewer tokens remain
    assert [g for r in report["runs"] if r["mode"] == "spec-adaptive" for g in r["stats"]["gammas"]]
    assert report["edge-only"]["target_forwards"] == 0
    # the proxy really carries the delay: every speculative round pays the added 40 ms
    by_rtt = next(iter(report["by_rtt"].values()))
    slow, fast = by_rtt["40"]["spec-fixed"], by_rtt["0"]["spec-fixed"]
    # (lower bounds only: a delay can only add time, whereas the 0 ms run's own time varies with the load)
    assert slow["latency_ms"] >= 0.9 * 40 * slow["rounds"] and fast["rounds"] == slow["rounds"]
    assert slow["network_ms"] >= 0.9 * 40 * slow["rounds"]
    assert by_rtt["40"]["edge-only"]["network_ms"] == 0
    sessions = report["multi_session"]
    assert [s["sessions"] for s in sessions] == [1, 2]
    assert all(s["total_verified_tokens_per_second"] > 0 for s in sessions)
    assert report["meta"]["title"] == "tiny" and "specd bench" in report["meta"]["command"]
    assert len(report["runs"]) == 2 * len(MODES)
    # every answer read its prompt as a new question does, whichever mode or round trip read it before
    from transformers import AutoTokenizer

    from specd.desktop.bench.prompts import select_prompts

    tokenizer = AutoTokenizer.from_pretrained(load_config(config_file).models.draft)
    prompt = tokenizer.apply_chat_template(select_prompts(1)[0].conversation(), add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    cached = {r["stats"]["cached_prompt_tokens"] for r in report["runs"] if r["mode"] != "edge-only"}
    assert len(cached) == 1 and 0 < cached.pop() < len(prompt) - 4
    text = (out / "report.md").read_text()
    assert "| spec-pipelined |" in text and "Concurrent edge clients" in text and "by added RTT" in text
    for name in ("speedup_vs_rtt.png", "time_breakdown.png", "acceptance_by_position.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


def test_bench_flags_are_checked():
    from specd.desktop.bench.cli import check_args
    from specd.shared.errors import ConfigError

    for argv in (["--num-prompts", "11"], ["--iterations", "0"], ["--gamma", "0"], ["--rtt-ms", "-5"]):
        with pytest.raises(ConfigError):
            check_args(parse(*argv))
    args = parse("--modes", "cloud-only", "spec-adaptive", "--device", "cpu", "openvino:CPU")
    assert args.modes == ["cloud-only", "spec-adaptive"] and args.device == ["cpu", "openvino:CPU"]
    assert args.handler is run_bench  # `specd bench` runs the bench


async def test_two_devices_are_compared(config_file, tmp_path):
    # Whole rounds (no goodput budget): the spec-fixed cells below reproduce each other round for round.
    verifier_cfg = load_config(config_file, overrides={"server": {"port": 0}, "limits": {"goodput_budget": False}})
    out = tmp_path / "out"
    async with Verifier(verifier_cfg) as verifier:
        args = parse("--config", str(config_file), "--host", "127.0.0.1", "--port", str(verifier.port),
                     "--num-prompts", "1", "--iterations", "1", "--max-new-tokens", "6", "--temperature", "0",
                     "--modes", "cloud-only", "spec-adaptive", "--device", "torch:cpu", "cpu", "npu",
                     "--sessions", "0", "--no-hf-assisted", "--no-warmup", "--out", str(out))
        assert await bench_async(args) == 0
    report = json.loads((out / "bench.json").read_text())
    devices = report["devices"]
    assert [d["device"] for d in devices[:2]] == ["torch:cpu", "torch:cpu #2"]
    assert devices[2]["requested"] == "npu"  # no NPU here: it falls back, and the report says why
    assert devices[2]["choice"]["fallbacks"] and devices[2]["device"] == "torch:cpu #3"
    assert set(report["by_rtt"]) == {"torch:cpu", "torch:cpu #2", "torch:cpu #3"}
    assert set(report["speedup"]) == {"cloud-only", "spec-adaptive"}
    text = (out / "report.md").read_text()
    assert "## Devices compared" in text and "| torch:cpu #2 | cpu | spec-adaptive |" in text
    assert "fell back from" in text


async def test_the_copy_prompts_are_reported_beside_the_standard_set(config_file, tmp_path):
    """``--prompts standard copy`` with the context proposer on (spec-pipelined) and off (spec-no-context)."""
    # Whole rounds (no goodput budget): the spec-fixed cells below reproduce each other round for round.
    verifier_cfg = load_config(config_file, overrides={"server": {"port": 0}, "limits": {"goodput_budget": False}})
    out = tmp_path / "out"
    async with Verifier(verifier_cfg) as verifier:
        args = parse("--config", str(config_file), "--host", "127.0.0.1", "--port", str(verifier.port),
                     "--num-prompts", "1", "--iterations", "1", "--max-new-tokens", "8", "--temperature", "0",
                     "--rtt-ms", "0", "--prompts", "standard", "copy",
                     "--modes", "cloud-only", "spec-pipelined", "spec-no-context",
                     "--sessions", "0", "--no-hf-assisted", "--no-warmup", "--out", str(out))
        assert await bench_async(args) == 0
    report = json.loads((out / "bench.json").read_text())
    assert {r["prompt_set"] for r in report["runs"]} == {"standard", "copy"}
    assert {r["prompt_id"] for r in report["runs"] if r["prompt_set"] == "copy"} == {COPY_PROMPTS[0].id}
    assert set(report["by_prompt_set"]) == {"standard", "copy"}
    runs = {(r["mode"], r["prompt_set"]): r for r in report["runs"]}
    assert runs[("spec-no-context", "copy")]["stats"]["proposed_by_source"]["context"] == 0
    # greedy: with or without looked-up drafts, the answer is the target's own
    assert runs[("spec-pipelined", "copy")]["token_ids"] == runs[("cloud-only", "copy")]["token_ids"]
    assert runs[("spec-no-context", "copy")]["token_ids"] == runs[("cloud-only", "copy")]["token_ids"]
    gain = report["context_proposer_gain"]["copy"]
    assert gain and all(ratio > 0 for rtts in gain.values() for ratio in rtts.values())
    text = (out / "report.md").read_text()
    assert "## Prompt set: copy" in text and "## Prompt set: standard" in text
    assert "spec-pipelined (on) ÷ spec-no-context (off)" in text
