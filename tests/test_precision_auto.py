"""``draft_precision = "auto"`` end to end: real ONNX Runtime GenAI builds of a tiny draft, a real verifier
on 127.0.0.1, the choice measured, recorded beside the drafts and reused; measured later when no verifier
was reachable, measured again for another target or after the record was corrupted; an explicit precision
measuring nothing."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from specd.daemon.server import Verifier
from specd.desktop.client.adaptive import EstimatePriors
from specd.desktop.client.answer import Settings
from specd.desktop.commands.chat import stats_line
from specd.desktop.commands.launch import build_client
from specd.desktop.drafters import convert
from specd.desktop.precision.choice import record_path
from specd.desktop.precision.measure import MEASURE_PROMPTS, settle_precision
from specd.shared.config import load_config
from specd.shared.sampling import SamplingParams
from tests.tiny_models import perturbed_llama, save_tiny_ort_model, save_with_tokenizer, tiny_llama, tiny_ort_config

DEVICE = "onnxruntime-genai:cpu"
GREEDY = Settings(sampling=SamplingParams(temperature=0.0), max_new_tokens=12, seed=0, gamma_max=4)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two targets (named apart, as a verifier announces its folder's name) and a draft close to the first."""
    root = tmp_path_factory.mktemp("precision-models")
    target = tiny_llama(1, config=tiny_ort_config())
    return {"target": save_with_tokenizer(target, root / "target-a"),
            "other_target": save_tiny_ort_model(root / "target-b", seed=3),
            "draft": save_with_tokenizer(perturbed_llama(target, 0.3, seed=2), root / "draft")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the whole story below: the drafts built once, the record written, reused, replaced."""
    return tmp_path_factory.mktemp("precision-cache")


@pytest.fixture
def builds(monkeypatch):
    """The ONNX Runtime GenAI builds that really run, by precision."""
    made: list[str] = []
    real = convert.build_ortgenai

    def counting(hf_folder, out, precision, say, **kwargs):
        made.append(precision)
        return real(hf_folder, out, precision, say, **kwargs)

    monkeypatch.setattr(convert, "build_ortgenai", counting)
    return made


def client_config(models, cache, **models_section):
    return load_config(None, {"models": {"draft": str(models["draft"]), "draft_backend": "onnxruntime-genai",
                                         "cache_dir": str(cache), **models_section},
                              "sampling": {"temperature": 0.0}, "speculation": {"gamma_max": 4}})


def verifier_for(target):
    return Verifier(load_config(None, {"models": {"target": str(target)}, "server": {"port": 0}}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def settle(cfg, url: str):
    """Build a client the way `specd chat` does, settle its precision; (setup, pick, progress lines)."""
    said: list[str] = []
    setup = await asyncio.to_thread(build_client, cfg, device=DEVICE, url=url, progress=said.append)
    pick = await settle_precision(setup, cfg, said.append)
    return setup, pick, said


async def close(setup) -> None:
    await setup.client.close()
    setup.client.drafter.close()


async def test_auto_waits_for_a_verifier_then_measures_records_and_reuses_the_choice(models, cache, builds):
    cfg = client_config(models, cache)
    path = record_path(_row(cfg), cfg)
    # 1. No verifier reachable: the documented CPU default, nothing recorded, measured the next time.
    setup, pick, said = await settle(cfg, f"ws://127.0.0.1:{free_port()}")
    try:
        assert (pick.precision, pick.source) == ("int8", "default") and setup.client.drafter.precision == "int8"
        assert builds == ["int8"] and not path.exists()
        assert any("the verifier is not reachable" in line and "measured the next time" in line for line in said)
    finally:
        await close(setup)
    builds.clear()
    async with verifier_for(models["target"]) as verifier:
        url = f"ws://127.0.0.1:{verifier.port}"
        # 2. A verifier: int4 is built too, both are measured, the fastest kept and recorded with its figures.
        setup, pick, said = await settle(cfg, url)
        try:
            assert builds == ["int4"]  # int8 is cached from step 1
            assert any("building the int4 draft" in line for line in said)
            for precision in ("int4", "int8"):
                assert any(line.strip().startswith(f"measuring {precision}: acceptance ") and "ms/token" in line
                           for line in said), said
            record = json.loads(path.read_text())
            assert record["precision"] == pick.precision == setup.client.drafter.precision
            assert pick.source == "measured" and record["reason"] == pick.reason
            assert record["target"].startswith("target-a (tokenizer ")
            assert record["candidates"][0]["precision"] == pick.precision  # fastest first
            assert {c["precision"] for c in record["candidates"]} == {"int4", "int8"}
            speeds = [c["expected_tokens_per_second"] for c in record["candidates"]]
            assert speeds == sorted(speeds, reverse=True) and speeds[-1] > 0
            assert all(c["rounds"] >= len(MEASURE_PROMPTS) - 1 for c in record["candidates"])  # ≥ 1 a prompt
            # What was measured seeds the estimates the answers start from (acceptance, draft and verify time).
            chosen_figures = record["candidates"][0]
            priors = setup.client.estimate_priors
            assert priors.source == "draft precision record" and priors.gamma == chosen_figures["gamma"]
            assert priors.alpha == pytest.approx(chosen_figures["acceptance"], abs=1e-9)
            assert priors.draft_ms_per_token == pytest.approx(chosen_figures["draft_ms_per_token"])
            answer = await setup.client.generate([1, 9, 33, 4, 17], GREEDY)
            assert answer.stats.draft_precision == pick.precision and answer.stats.draft_precision_reason == pick.reason
            assert f"(onnxruntime-genai, {pick.precision})" in stats_line(answer)
        finally:
            await close(setup)
        chosen = pick.precision
        builds.clear()
        # 3. The next start opens the recorded choice: nothing built, nothing measured.
        setup, pick, said = await settle(cfg, url)
        try:
            assert builds == [] and setup.client.drafter.precision == chosen and pick.source == "measured"
            assert not any("measuring" in line for line in said)
            assert any("measured before, recorded in" in line and str(path) in line for line in said)
            assert setup.client.estimate_priors == EstimatePriors.from_record(json.loads(path.read_text()))
        finally:
            await close(setup)
        # 4. A corrupt record is named, removed, and the choice measured again (the drafts stay cached).
        path.write_text("{half a record")
        setup, pick, said = await settle(cfg, url)
        try:
            assert builds == []
            assert any(str(path) in line and "not valid JSON" in line for line in said)
            assert pick.source == "measured" and json.loads(path.read_text())["precision"] == pick.precision
        finally:
            await close(setup)
    # 5. Another target: the record was measured against target-a, so it is measured again.
    async with verifier_for(models["other_target"]) as verifier:
        setup, pick, said = await settle(cfg, f"ws://127.0.0.1:{verifier.port}")
        try:
            assert builds == [] and pick.source == "measured"
            assert any("measuring again against target-b" in line for line in said)
            assert json.loads(path.read_text())["target"].startswith("target-b (tokenizer ")
        finally:
            await close(setup)


async def test_an_explicit_precision_is_opened_and_never_measured(models, cache, builds):
    cfg = client_config(models, cache, draft_precision="int4")
    async with verifier_for(models["target"]) as verifier:
        setup, pick, said = await settle(cfg, f"ws://127.0.0.1:{verifier.port}")
    try:
        assert (pick.precision, pick.source) == ("int4", "config") and setup.client.drafter.precision == "int4"
        assert not any("measuring" in line for line in said)
        assert 'Draft precision: int4: [models] draft_precision = "int4" is set' in said
    finally:
        await close(setup)


def _row(cfg):
    from specd.desktop.drafters.devices import probe_devices

    return next(row for row in probe_devices(cfg, catalog=None) if row.id == DEVICE)
