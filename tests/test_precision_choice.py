"""``draft_precision = "auto"`` without models: the ranking of measured candidates (the γ controller's
expected tokens per second at the pooled round trip), the candidates and default of each kind of device,
and the record of a choice (valid only for its draft model, backend and device; a corrupt one is named,
removed and measured again). The end-to-end choice against a real verifier is in test_precision_auto.py."""

from __future__ import annotations

import json

import pytest

from specd.desktop.client.adaptive import EstimatePriors, GammaController
from specd.desktop.drafters.devices import DeviceRow
from specd.desktop.precision.choice import (
    DEFAULT_PRECISION,
    PREPARED,
    candidates,
    load_record,
    pick_precision,
    read_record,
    record_identity,
    record_path,
    write_record,
)
from specd.desktop.precision.measure import choice_reason, measure_settings
from specd.desktop.precision.ranking import (
    CandidateFigures,
    MeasuredRound,
    RecordingController,
    rank_candidates,
)
from specd.shared.config import load_config

CPU = DeviceRow("onnxruntime-genai:cpu", "onnxruntime-genai", "cpu", "Test CPU", "cpu")
DML = DeviceRow("onnxruntime-genai:dml", "onnxruntime-genai", "gpu", "GPU (Windows ML)", "DmlExecutionProvider")
QNN = DeviceRow("onnxruntime-genai:qnn", "onnxruntime-genai", "npu", "NPU (Windows ML)", "QNNExecutionProvider")
OV_GPU = DeviceRow("openvino:GPU", "openvino", "gpu", "Intel GPU", "GPU")
OV_NPU = DeviceRow("openvino:NPU", "openvino", "npu", "Intel NPU", "NPU")
TORCH_CPU = DeviceRow("torch:cpu", "torch", "cpu", "Test CPU", "cpu")
TORCH_GPU = DeviceRow("torch:cuda:0", "torch", "gpu", "NVIDIA GPU", "cuda:0")


def rounds(n: int, *, gamma: int, accepted: int, draft_ms_per_token: float, network_ms: float = 1.0,
           verify_ms: float = 20.0) -> tuple[MeasuredRound, ...]:
    return tuple(MeasuredRound(gamma, accepted, gamma * draft_ms_per_token, network_ms, verify_ms) for _ in range(n))


# -- ranking -------------------------------------------------------------------------------------
def test_the_candidate_the_draft_agrees_with_more_often_wins_at_equal_draft_time():
    int4 = CandidateFigures("int4", rounds(30, gamma=4, accepted=1, draft_ms_per_token=8.0))
    int8 = CandidateFigures("int8", rounds(30, gamma=4, accepted=3, draft_ms_per_token=8.0))
    ranked = rank_candidates([int4, int8], gamma_max=8)
    assert [c.precision for c in ranked] == ["int8", "int4"]
    assert ranked[0].tokens_per_second > ranked[1].tokens_per_second > 0
    assert ranked[0].acceptance == pytest.approx(0.75) and ranked[1].acceptance == pytest.approx(0.25)
    assert ranked[0].draft_ms_per_token == pytest.approx(8.0)


def test_a_draft_too_slow_for_its_acceptance_loses():
    """int8 agrees more, but drafts 25 times slower than int4: int4's rounds are faster in the end."""
    int4 = CandidateFigures("int4", rounds(30, gamma=4, accepted=2, draft_ms_per_token=2.0))
    int8 = CandidateFigures("int8", rounds(30, gamma=4, accepted=3, draft_ms_per_token=50.0))
    assert [c.precision for c in rank_candidates([int8, int4], gamma_max=8)] == ["int4", "int8"]


def test_the_round_trip_is_pooled_so_a_candidate_measured_while_the_network_was_slow_is_not_penalised():
    """Same acceptance and draft time, but int4's rounds met a 200 ms round trip: both are ranked at the
    pooled round trip, so they come out equal (and keep the order given)."""
    int4 = CandidateFigures("int4", rounds(20, gamma=4, accepted=2, draft_ms_per_token=5.0, network_ms=200.0))
    int8 = CandidateFigures("int8", rounds(20, gamma=4, accepted=2, draft_ms_per_token=5.0, network_ms=1.0))
    ranked = rank_candidates([int4, int8], gamma_max=8)
    assert [c.precision for c in ranked] == ["int4", "int8"]
    assert ranked[0].tokens_per_second == pytest.approx(ranked[1].tokens_per_second)
    assert ranked[0].network_ms == ranked[1].network_ms and 1.0 < ranked[0].network_ms < 200.0


def test_the_expected_speed_is_the_gamma_controllers_own_estimate():
    """With a single candidate the pooled and own estimates are one controller's: its best γ's expected
    tokens over its round time."""
    measured = rounds(25, gamma=3, accepted=2, draft_ms_per_token=4.0, network_ms=10.0, verify_ms=30.0)
    ranked = rank_candidates([CandidateFigures("int8", measured)], gamma_max=6)[0]
    controller = GammaController(6, forgetting=0.02, priors=EstimatePriors(samples=0.0))
    for r in measured:
        controller.observe_round(drafted=r.drafted, accepted=r.accepted, draft_ms=r.draft_ms,
                                 network_ms=r.network_ms, verify_ms=r.verify_ms)
    rate = controller.expected_tokens(ranked.gamma) / controller.round_ms(ranked.gamma) * 1000.0
    assert ranked.tokens_per_second == pytest.approx(rate)
    assert all(controller.expected_tokens(g) / controller.round_ms(g) * 1000.0 <= rate * (1 + 1e-9)
               for g in range(1, 7))


def test_candidates_without_rounds_are_left_out():
    ranked = rank_candidates([CandidateFigures("int4", ()), CandidateFigures("int8", rounds(5, gamma=2, accepted=1,
                                                                                            draft_ms_per_token=3.0))],
                             gamma_max=4)
    assert [c.precision for c in ranked] == ["int8"]
    assert rank_candidates([CandidateFigures("int4", ())], gamma_max=4) == []


def test_the_recording_controller_keeps_what_it_observes_and_still_adapts():
    controller = RecordingController(8)
    for _ in range(10):
        controller.observe_round(drafted=4, accepted=4, draft_ms=4.0, network_ms=0.5, verify_ms=10.0)
    assert controller.rounds == [MeasuredRound(4, 4, 4.0, 0.5, 10.0)] * 10
    assert controller.alpha > 0.9 and controller.choose() > 4  # every draft accepted: longer rounds pay


def test_a_measuring_answer_is_verified_rounds_only_whatever_the_config_says():
    config = load_config(None)
    assert config.speculation.mode_switching and config.speculation.pipeline
    settings = measure_settings(config)
    assert not settings.mode_switching and not settings.pipeline and settings.gamma is None


def test_the_reason_names_every_candidate_with_its_figures():
    ranked = rank_candidates([CandidateFigures("int4", rounds(20, gamma=4, accepted=1, draft_ms_per_token=8.0)),
                              CandidateFigures("int8", rounds(20, gamma=4, accepted=3, draft_ms_per_token=9.8))], 8)
    reason = choice_reason(ranked, "Test CPU", "tiny-target")
    assert reason.startswith("int8, measured fastest on Test CPU: int8 ")
    assert "acceptance 0.75, 9.8 ms/token" in reason and "against int4 " in reason and "acceptance 0.25" in reason
    assert "round trip to tiny-target" in reason


# -- candidates and defaults ------------------------------------------------------------------------
@pytest.mark.parametrize(("row", "expected"), [
    (CPU, ("int4", "int8")),
    (DML, ("int4", "fp16")),  # DirectML's builder has no int8
    (OV_GPU, ("int4", "int8", "fp16")),
    (OV_NPU, ("int4",)),  # the NPU compiler wants integer weights
    (QNN, (PREPARED,)),  # the QNN draft is built beforehand, for that NPU
    (TORCH_CPU, ("fp32",)), (TORCH_GPU, ("fp16",)),  # torch runs the model's own weights
])
def test_the_candidates_of_each_kind_of_device(row, expected):
    assert candidates(row, load_config(None)) == expected


def test_without_a_record_the_documented_default_of_the_device_is_used(tmp_path):
    cfg = load_config(None, {"models": {"cache_dir": str(tmp_path)}})
    pick = pick_precision(CPU, cfg)
    assert (pick.precision, pick.source) == (DEFAULT_PRECISION["cpu"], "default") == ("int8", "default")
    assert "until it is measured against a verifier" in pick.reason and "2.4×" in pick.reason
    assert pick_precision(DML, cfg).precision == "fp16"
    assert pick_precision(OV_NPU, cfg).source == "only"


@pytest.mark.parametrize("explicit", ["int4", "int8", "fp32"])
def test_an_explicit_precision_wins_over_a_record(tmp_path, explicit):
    cfg = load_config(None, {"models": {"cache_dir": str(tmp_path), "draft_precision": explicit}})
    write_record(record_path(CPU, cfg), valid_record(CPU, cfg, "int8"))
    pick = pick_precision(CPU, cfg)
    assert (pick.precision, pick.source) == (explicit, "config")
    assert f'[models] draft_precision = "{explicit}" is set' in pick.reason


def test_an_explicit_precision_the_builder_lacks_says_what_was_built(tmp_path):
    cfg = load_config(None, {"models": {"cache_dir": str(tmp_path), "draft_precision": "int8"}})
    pick = pick_precision(DML, cfg)
    assert pick.precision == "int4" and "the dml builder has no int8" in pick.reason


# -- the record --------------------------------------------------------------------------------------
def valid_record(row: DeviceRow, cfg, precision: str) -> dict:
    return {"precision": precision, "reason": f"{precision}, measured fastest", "target": "t (tokenizer x)",
            **record_identity(row, cfg)}


def test_a_record_is_used_for_its_draft_backend_and_device(tmp_path):
    cfg = load_config(None, {"models": {"cache_dir": str(tmp_path)}})
    path = record_path(CPU, cfg)
    assert path == tmp_path / "drafts" / "precision-smollm2-135m-instruct-onnxruntime-genai_cpu.json"
    write_record(path, valid_record(CPU, cfg, "int4"))
    pick = pick_precision(CPU, cfg)
    assert (pick.precision, pick.source, pick.reason) == ("int4", "measured", "int4, measured fastest")
    assert json.loads(path.read_text())["format"] == "specd-draft-precision-1"


def test_a_record_of_another_device_or_draft_model_is_not_used(tmp_path):
    cfg = load_config(None, {"models": {"cache_dir": str(tmp_path)}})
    write_record(record_path(CPU, cfg), valid_record(CPU, cfg, "int4"))
    other_cpu = DeviceRow(CPU.id, CPU.backend, "cpu", "Another CPU", "cpu")  # same row id, another machine
    assert record_path(other_cpu, cfg) == record_path(CPU, cfg)
    assert pick_precision(other_cpu, cfg).source == "default"
    draft = tmp_path / "my-draft"
    draft.mkdir()
    other_model = load_config(None, {"models": {"cache_dir": str(tmp_path), "draft": str(draft)}})
    assert record_path(CPU, other_model) != record_path(CPU, cfg)
    write_record(record_path(CPU, other_model), valid_record(CPU, cfg, "int4"))  # written for the preset
    assert pick_precision(CPU, other_model).source == "default"


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "specd-draft-precision-1", "precision": 4}'])
def test_a_corrupt_record_is_named_removed_and_the_default_used_until_measured_again(tmp_path, content):
    cfg = load_config(None, {"models": {"cache_dir": str(tmp_path)}})
    path = record_path(CPU, cfg)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    # `specd devices` only reports it
    shown = pick_precision(CPU, cfg, read_only=True)
    assert shown.source == "default" and str(path) in shown.reason and path.exists()
    said: list[str] = []
    pick = pick_precision(CPU, cfg, said.append)
    assert pick.source == "default" and not path.exists()
    assert len(said) == 1 and str(path) in said[0] and "measured again" in said[0]
    assert read_record(path) is None and load_record(path) is None


# -- specd devices ----------------------------------------------------------------------------------
def test_specd_devices_shows_each_rows_precision_and_why_for_the_best(tmp_path, capsys, monkeypatch):
    from specd.desktop.commands import devices

    best = DeviceRow(CPU.id, CPU.backend, "cpu", CPU.name, "cpu", best=True)
    config = tmp_path / "config.toml"
    config.write_text(f'[models]\ncache_dir = "{tmp_path}"\n')
    monkeypatch.setattr(devices, "probe_devices", lambda _cfg: [best, TORCH_CPU])
    args = type("Args", (), {"config": str(config), "json": False})()
    devices.run_devices(args)
    table = capsys.readouterr().out
    assert "PRECISION" in table and "int8 (default)" in table and "fp32 (only)" in table
    assert "draft precision there: int8, the default for a CPU draft until it is measured" in table
    args.json = True
    devices.run_devices(args)
    rows = {row["id"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[CPU.id]["draft_precision"] == "int8" and rows[CPU.id]["draft_precision_source"] == "default"
    assert "2.4×" in rows[CPU.id]["draft_precision_reason"]
    assert rows[TORCH_CPU.id]["draft_precision"] == "fp32"
