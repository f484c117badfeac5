"""The verifier batches concurrent sessions: real websockets on 127.0.0.1, a real tiny target.

Greedy answers of concurrent sessions (speculative and cloud-only) equal transformers' own greedy
decoding of each prompt alone; /healthz and /metrics show the capacity and the batches; a KV budget
smaller than max_sessions refuses the session beyond it with ``too_many_sessions``; and
``specd-verifier capacity`` writes its table, JSON and Markdown from a tiny model and recording.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request

import pytest

from specd.daemon.capacity_cli import capacity_main
from specd.daemon.server import Verifier
from specd.shared import messages as m
from specd.shared.fingerprint import tokenizer_fingerprint
from tests.daemon_support import Client, daemon_config, greedy_reference
from tests.tiny_models import save_tiny_model, tiny_llama, tiny_tokenizer

FINGERPRINT = tokenizer_fingerprint(tiny_tokenizer())
PROMPTS = [[1, *[(5 * i + j) % 58 + 3 for j in range(4 + 2 * i)]] for i in range(6)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


async def test_concurrent_sessions_share_forwards_and_answer_as_if_alone(tiny_folder):
    model = tiny_llama(1)
    references = [greedy_reference(model, p, 20, [2]) for p in PROMPTS]
    async with Verifier(daemon_config(tiny_folder)) as v:
        health = json.loads(await asyncio.to_thread(_get, f"http://127.0.0.1:{v.port}/healthz"))
        assert health["capacity"] == 16 and health["batched"] is True and health["sessions"] == 0

        async def speculative(prompt, reference):
            client = await Client.open(v.url, FINGERPRINT)
            await client.start(prompt, 20, sampling=m.Sampling(temperature=0.0))
            rounds = 0
            while not client.session.finished:
                done = len(client.session.committed) - len(prompt)
                # right drafts on even rounds, wrong ones on odd rounds: accepts and rollbacks both happen
                drafts = (reference[done:done + 3] if rounds % 2 == 0 else [4, 5, 6]) or [4]
                await client.round(drafts)
                rounds += 1
            await client.close()
            return client.session.generated

        async def cloud(prompt):
            client = await Client.open(v.url, FINGERPRINT)
            await client.start(prompt, 20, sampling=m.Sampling(temperature=0.0), mode="cloud")
            tokens = await client.stream_all()
            await client.close()
            return tokens

        answers = await asyncio.gather(*(speculative(p, r) for p, r in zip(PROMPTS[:3], references[:3], strict=True)),
                                       *(cloud(p) for p in PROMPTS[3:]))
        metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{v.port}/metrics")
    # Tiny random models have no near-ties at this sharpness: every answer is exactly the reference.
    assert answers == references
    shared = [line for line in metrics.splitlines() if line.startswith('specd_batch_sessions_bucket{le="1"}')]
    total = [line for line in metrics.splitlines() if line.startswith("specd_batch_sessions_count")]
    assert shared and total and int(shared[0].split()[-1]) < int(total[0].split()[-1])  # some forwards served 2+
    assert "specd_batch_tokens_bucket" in metrics


async def test_a_kv_budget_below_max_sessions_refuses_with_too_many_sessions(tiny_folder):
    per_position = 2 * 2 * 2 * 8 * 4  # k and v, 2 layers, 2 kv heads, head_dim 8, float32
    budget = 2 * 64 * per_position / (1 << 30)
    async with Verifier(daemon_config(tiny_folder, max_sessions=8, max_input_tokens=32, max_total_tokens=64,
                                      kv_cache_gib=budget)) as v:
        assert v.capacity == 2 and v.health()["capacity"] == 2
        first = await Client.open(v.url, FINGERPRINT)
        second = await Client.open(v.url, FINGERPRINT)
        third = await Client.open(v.url, FINGERPRINT, hello=False)
        refused = await third.message()
        assert (refused.code, refused.fatal) == ("too_many_sessions", True)
        assert "kv_cache_gib" in refused.message
        await first.start([1, 5, 6], 4, sampling=m.Sampling(temperature=0.0))
        assert (await first.round([7])).verdict.position == 3
        await first.close()
        await second.close()


def test_capacity_writes_its_table_json_and_markdown(tiny_folder, tmp_path, capsys):
    recording = {"draft": "tiny", "target": "tiny", "gamma": 4, "sessions": [
        {"prompt": [1, 5, 6, 7], "rounds": [{"drafts": [8, 9, 10, 11], "accepted": 2},
                                            {"drafts": [12, 13, 14, 15], "accepted": 4}]},
        {"prompt": [1, 20, 21], "rounds": [{"drafts": [22, 23, 24, 25], "accepted": 0}]}]}
    path = tmp_path / "rounds.json"
    path.write_text(json.dumps(recording))
    out = tmp_path / "out"
    code = capacity_main(["--model", str(tiny_folder), "--device", "cpu", "--sessions", "1", "3", "--gamma", "2",
                          "--tokens", "6", "--recording", str(path), "--one-session-per-forward", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "capacity.json").read_text())
    cells = report["cells"]
    assert {(c["mode"], c["batched"], c["sessions"]) for c in cells} == {
        (mode, batched, n) for mode in ("speculative", "cloud") for batched in (True, False) for n in (1, 3)}
    spec = [c for c in cells if c["mode"] == "speculative"]
    # replayed acceptance: per round min(accepted, γ=2) of 2 drafts, recorded 2, 2 and 0
    assert all(0 < c["acceptance"] <= 1 for c in spec) and all(c["gamma"] == 2 for c in spec)
    assert all(c["tokens"] >= 6 * c["sessions"] and c["aggregate_tps"] > 0 for c in cells)
    assert all(c["mean_batch"] == 1 for c in cells if not c["batched"])
    assert set(report["batching_speedup"]) == {"speculative γ=2", "cloud"}
    # the goodput budget's cells (batched only) and the headline per N beside the fixed γ
    budget = [c for c in spec if c["budget"]]
    assert [c["sessions"] for c in budget] == [1, 3] and all(c["batched"] for c in budget)
    assert all(0 <= c["verified_gamma"] <= 2 for c in budget)
    assert [row["sessions"] for row in report["headline"]] == [1, 3]
    for row in report["headline"]:
        assert row["best_fixed"]["gamma"] == 2 and row["budget"]["vs_cloud"] > 0 and row["budget_vs_best_fixed"] > 0
    assert report["meta"]["shared_population"] is True
    markdown = (out / "capacity.md").read_text()
    assert "| speculative |" in markdown and "| speculative budget |" in markdown and "budget ÷ best" in markdown
    assert "share one pooled acceptance" in markdown
    printed = capsys.readouterr().out
    assert "tok/s all" in printed and "budget ÷ best" in printed


def test_capacity_repeats_measure_every_cell_in_turn_and_combine_them(tiny_folder, tmp_path, caplog):
    recording = {"draft": "tiny", "target": "tiny", "gamma": 2, "sessions": [
        {"prompt": [1, 5, 6, 7], "rounds": [{"drafts": [8, 9], "accepted": 1}, {"drafts": [12, 13], "accepted": 2}]}]}
    path = tmp_path / "rounds.json"
    path.write_text(json.dumps(recording))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="specd.daemon.capacity"):
        code = capacity_main(["--model", str(tiny_folder), "--device", "cpu", "--sessions", "1", "2", "--gamma", "2",
                              "--tokens", "4", "--recording", str(path), "--repeat", "2", "--out", str(out)])
    assert code == 0
    started = [r.getMessage().split("] ", 1)[1] for r in caplog.records if r.getMessage().startswith("[")]
    one = ["speculative, 1 session(s), γ=2", "cloud, 1 session(s)",
           "speculative, 1 session(s) under the goodput budget, γ ≤ 2"]
    assert started[:6] == one + one  # each N's cells in turn, pass after pass, before the next N
    assert len(started) == 12
    report = json.loads((out / "capacity.json").read_text())
    assert report["meta"]["repeat"] == 2 and len(report["cells"]) == 6
    for cell in report["cells"]:
        assert cell["repeats"] == 2 and cell["tokens"] >= 2 * 4 * cell["sessions"]
        assert cell["aggregate_tps"] == pytest.approx(cell["tokens"] / cell["wall_s"], rel=1e-3)
    assert "--repeat 2" in (out / "capacity.md").read_text()


def test_combined_cells_weigh_each_pass_by_what_it_counted():
    from specd.daemon.capacity import Cell, combine

    def cell(tokens, wall, rounds, verified, acceptance, forwards, width, p50, p99):
        return Cell(mode="speculative", batched=True, sessions=4, gamma=4, tokens=tokens, wall_s=wall,
                    aggregate_tps=tokens / wall, per_user_tps=tokens / wall / 4, p50_ms=p50, p99_ms=p99,
                    device_s_per_1k=wall / tokens * 1000, acceptance=acceptance, forwards=forwards, mean_batch=4.0,
                    verified_gamma=verified, mean_width=width, rounds=rounds)

    both = combine([cell(100, 2.0, 40, 2.0, 0.5, 10, 3.0, 80.0, 120.0),
                    cell(300, 4.0, 60, 4.0, 0.75, 30, 5.0, 90.0, 200.0)])
    assert both.tokens == 400 and both.wall_s == 6.0 and both.aggregate_tps == pytest.approx(400 / 6, abs=1e-3)
    assert both.rounds == 100 and both.forwards == 40 and both.repeats == 2
    # 80 drafts verified at 0.5 and 240 at 0.75
    assert both.verified_gamma == pytest.approx(3.2) and both.acceptance == pytest.approx((40 + 180) / 320, abs=1e-4)
    assert both.mean_width == pytest.approx((30 + 150) / 40) and both.device_s_per_1k == pytest.approx(15.0)
    assert both.p50_ms == 85.0 and both.p99_ms == 200.0


def test_capacity_builds_a_random_model_of_a_shape(tmp_path, monkeypatch):
    from specd.daemon import capacity

    # the real shapes need gigabytes; a tiny Qwen2 takes the same path
    monkeypatch.setitem(capacity.SHAPES, "tiny-qwen2", dict(
        model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    recording = {"sessions": [{"prompt": [1, 5, 6], "rounds": [{"drafts": [7, 8], "accepted": 1}]}]}
    path = tmp_path / "rounds.json"
    path.write_text(json.dumps(recording))
    code = capacity_main(["--random-weights", "--shape", "tiny-qwen2", "--device", "cpu", "--sessions", "2",
                          "--gamma", "2", "--tokens", "4", "--modes", "speculative", "--recording", str(path),
                          "--no-budget", "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "capacity.json").read_text())
    assert report["meta"]["target"] == "tiny-qwen2 (random weights)"
    (cell,) = report["cells"]
    assert cell["acceptance"] == 0.5 and cell["mean_batch"] > 1  # two sessions shared forwards


def test_capacity_names_a_bad_recording(tmp_path, capsys):
    path = tmp_path / "rounds.json"
    path.write_text("{}")
    assert capacity_main(["--recording", str(path), "--device", "cpu"]) == 2
    assert "--recording" in capsys.readouterr().err
