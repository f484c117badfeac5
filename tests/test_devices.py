"""Device probing, ranking, config overrides, fallback with reasons, and the Windows ML catalog path
(through a thin fake catalog: the real one exists only on Windows)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from specd.desktop.cli import main
from specd.desktop.drafters import load_drafter, winml
from specd.desktop.drafters.devices import DeviceRow, format_table, plan_devices, probe_devices
from specd.shared.config import load_config
from specd.shared.errors import DeviceError
from tests.tiny_models import save_tiny_model


@dataclass
class FakeCatalog:
    """Stands in for Windows ML's ExecutionProviderCatalog; records what was asked of it."""

    offered: list[winml.CatalogProvider]
    ensured: list[str] = field(default_factory=list)

    def providers(self) -> list[winml.CatalogProvider]:
        return list(self.offered)

    def ensure_ready(self, name: str) -> str:
        self.ensured.append(name)
        return f"C:/Windows/System32/fake/{name}.dll"


def windows_laptop_catalog() -> FakeCatalog:
    return FakeCatalog([winml.CatalogProvider("QNNExecutionProvider", ready=True, library_path="qnn.dll"),
                        winml.CatalogProvider("DmlExecutionProvider", ready=False),
                        winml.CatalogProvider("SomeFutureExecutionProvider", ready=True)])


def config(tmp_path=None, **sections):
    return load_config(None, overrides=sections)


def test_specd_devices_json_lists_usable_cpu_rows_for_every_backend(capsys):
    assert main(["devices", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    cpu = {row["backend"]: row for row in rows if row["kind"] == "cpu"}
    assert set(cpu) == {"torch", "onnxruntime-genai", "openvino"}
    for row in cpu.values():
        assert row["available"] is True and row["reason"] == ""
        assert {"id", "backend", "kind", "name", "available", "reason", "best"} <= set(row)
    assert sum(row["best"] for row in rows) == 1
    assert next(row for row in rows if row["best"])["id"] == "onnxruntime-genai:cpu"  # the fastest CPU drafter


def test_specd_devices_prints_a_table(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime-genai:cpu" in out and "openvino:CPU" in out and "torch:cpu" in out


def test_ranking_prefers_npu_then_gpu_then_cpu():
    rows = [DeviceRow("torch:cpu", "torch", "cpu", "CPU", "cpu"),
            DeviceRow("openvino:GPU.0", "openvino", "gpu", "Intel Arc", "GPU.0"),
            DeviceRow("openvino:NPU", "openvino", "npu", "Intel AI Boost", "NPU"),
            DeviceRow("onnxruntime-genai:cpu", "onnxruntime-genai", "cpu", "CPU", "cpu")]
    plan = plan_devices(rows, config())
    assert [r.id for r in plan.candidates] == ["openvino:NPU", "openvino:GPU.0", "onnxruntime-genai:cpu", "torch:cpu"]
    assert plan.fallbacks == []
    cpu_first = plan_devices(rows, config(devices={"edge_device": "cpu"}))
    assert cpu_first.candidates[0].id == "onnxruntime-genai:cpu"
    torch_only = plan_devices(rows, config(models={"draft_backend": "torch"}))
    assert [r.id for r in torch_only.candidates] == ["torch:cpu"]


def test_config_disables_devices_with_a_reason(monkeypatch):
    import specd.desktop.drafters.devices as devices

    fake = [DeviceRow("openvino:GPU.0", "openvino", "gpu", "Intel Arc", "GPU.0"),
            DeviceRow("openvino:GPU.1", "openvino", "gpu", "NVIDIA", "GPU.1"),
            DeviceRow("openvino:NPU", "openvino", "npu", "Intel AI Boost", "NPU"),
            DeviceRow("openvino:CPU", "openvino", "cpu", "CPU", "CPU")]
    monkeypatch.setattr(devices, "probe_openvino", lambda: fake)
    rows = {r.id: r for r in probe_devices(config(devices={"gpu": {"device_id": 1}, "npu": {"enabled": False}}),
                                           catalog=None)}
    assert rows["openvino:NPU"].available is False and "[devices.npu] enabled = false" in rows["openvino:NPU"].reason
    assert rows["openvino:GPU.0"].available is False and "device_id = 1" in rows["openvino:GPU.0"].reason
    assert rows["openvino:GPU.1"].available and rows["openvino:GPU.1"].best
    rows = {r.id: r for r in probe_devices(config(devices={"gpu": {"enabled": False}}), catalog=None)}
    assert "[devices.gpu] enabled = false" in rows["openvino:GPU.1"].reason
    assert rows["openvino:NPU"].best


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-devices") / "hf", seed=4)


def test_requesting_an_absent_device_falls_back_with_the_reason(tiny_hf, tmp_path):
    cfg = config(models={"draft": str(tiny_hf), "draft_backend": "torch", "cache_dir": str(tmp_path)},
                 devices={"edge_device": "npu"})
    messages: list[str] = []
    drafter, choice = load_drafter(cfg, progress=messages.append, catalog=None)
    assert choice.row.id == "torch:cpu" and choice.requested == "npu"
    assert choice.fell_back and choice.fallbacks[0].device == "npu"
    assert "no NPU found" in choice.fallbacks[0].reason
    assert "fell back from npu" in choice.summary() and any("npu" in m for m in messages)
    drafter.close()
    _, choice = load_drafter(cfg, device="openvino:GPU.3", catalog=None)
    assert choice.fallbacks[0].device == "openvino:GPU.3" and "no such device" in choice.fallbacks[0].reason


def test_a_device_that_fails_to_load_is_skipped_and_recorded(tiny_hf, tmp_path):
    cfg = config(models={"draft": str(tiny_hf), "draft_backend": "torch", "cache_dir": str(tmp_path)})
    broken = DeviceRow("torch:cuda:0", "torch", "gpu", "Imaginary GPU", "cuda:0")
    rows = [broken, DeviceRow("torch:cpu", "torch", "cpu", "CPU", "cpu")]
    drafter, choice = load_drafter(cfg, rows=rows, catalog=None)
    assert choice.row.id == "torch:cpu"
    assert choice.fallbacks[0].device == "torch:cuda:0" and "CUDA" in choice.fallbacks[0].reason
    with pytest.raises(DeviceError, match="no device can run the draft model"):
        load_drafter(cfg, rows=[broken], catalog=None)
    drafter.close()


def test_windows_ml_catalog_rows_rank_npu_first():
    catalog = windows_laptop_catalog()
    rows = probe_devices(config(), catalog=catalog)
    by_id = {r.id: r for r in rows}
    qnn, dml = by_id["onnxruntime-genai:qnn"], by_id["onnxruntime-genai:dml"]
    # A QNN NPU runs only models built for it: unusable until [devices.npu] model_path names one.
    assert (qnn.kind, qnn.device, qnn.available) == ("npu", "QNNExecutionProvider", False)
    assert "[devices.npu] model_path" in qnn.reason
    assert (dml.kind, dml.detail, dml.best) == ("gpu", "Windows ML installs it on first use", True)
    rows = probe_devices(config(devices={"npu": {"model_path": "C:/models/llama-qnn"}}), catalog=catalog)
    assert rows[0].id == "onnxruntime-genai:qnn" and rows[0].available and rows[0].best
    assert not any("SomeFuture" in r.device for r in rows)  # providers specd does not know are left out
    assert "QNNExecutionProvider (Windows ML)" in format_table(rows)


def test_windows_ml_providers_are_registered_then_fall_back_to_the_cpu(tiny_hf, tmp_path, monkeypatch):
    """On this (non-Windows) machine the fake catalog's libraries cannot load: the loader must say why for
    each provider, and end on the CPU provider."""
    registered: list[tuple[str, str]] = []
    import onnxruntime_genai

    def fake_register(name, path):
        registered.append((name, path))
        raise RuntimeError(f"Error loading {path}")

    monkeypatch.setattr(onnxruntime_genai, "register_execution_provider_library", fake_register)
    catalog = windows_laptop_catalog()
    cfg = config(models={"draft": str(tiny_hf), "cache_dir": str(tmp_path), "draft_precision": "fp32"})
    rows = [r for r in probe_devices(cfg, catalog=catalog) if r.backend == "onnxruntime-genai"]
    rows.append(DeviceRow("torch:cpu", "torch", "cpu", "CPU", "cpu"))  # GQA needs head size 16: see below
    drafter, choice = load_drafter(cfg, rows=rows, catalog=catalog)
    reasons = {f.device: f.reason for f in choice.fallbacks}
    assert "onnxruntime-genai:qnn" not in reasons  # known unusable from the probe: not tried
    assert "DmlExecutionProvider" in reasons["onnxruntime-genai:dml"]
    assert catalog.ensured == ["DmlExecutionProvider"]
    assert registered == [("DmlExecutionProvider", "C:/Windows/System32/fake/DmlExecutionProvider.dll")]
    # The shared tiny model's head size (8) is below what ORT's attention kernel takes, so the CPU provider
    # fails its smoke test too and the drafter ends on torch: every step is recorded.
    assert "onnxruntime-genai:cpu" in reasons and choice.row.id == "torch:cpu"
    drafter.close()


# -- the real catalog class over a fake projection ----------------------------------------------------
@pytest.fixture
def projection(monkeypatch):
    """WindowsMLCatalog over tests/fake_windows_ml.py instead of the Windows-only projection."""
    from tests import fake_windows_ml as ml

    state, result = ml.ExecutionProviderReadyState, ml.ExecutionProviderReadyResultState
    ml.ExecutionProviderCatalog.default = ml.ExecutionProviderCatalog([
        ml.ExecutionProvider("QNNExecutionProvider", state.READY, "C:/qnn/QnnHtp.dll"),
        ml.ExecutionProvider("DmlExecutionProvider", state.NOT_READY, installed_path="C:/dml/dml.dll"),
        ml.ExecutionProvider("OpenVINOExecutionProvider", state.NOT_PRESENT, install_result=result.FAILURE)])
    monkeypatch.setattr(winml, "_import_projection", lambda: (ml, object()))
    yield ml
    ml.ExecutionProviderCatalog.default = None


def test_windows_ml_catalog_reads_the_ready_states_of_the_projection(projection):
    rows = winml.WindowsMLCatalog().providers()
    assert [(r.name, r.ready, r.library_path) for r in rows] == [
        ("QNNExecutionProvider", True, "C:/qnn/QnnHtp.dll"), ("DmlExecutionProvider", False, ""),
        ("OpenVINOExecutionProvider", False, "")]


def test_windows_ml_catalog_installs_a_provider_or_says_why_not(projection):
    catalog = winml.WindowsMLCatalog()
    assert catalog.ensure_ready("DmlExecutionProvider") == "C:/dml/dml.dll"
    with pytest.raises(DeviceError, match=r"could not install OpenVINOExecutionProvider: download of .* failed"):
        catalog.ensure_ready("OpenVINOExecutionProvider")
    with pytest.raises(DeviceError, match="offers no VitisAIExecutionProvider"):
        catalog.ensure_ready("VitisAIExecutionProvider")


def test_a_windows_ml_catalog_that_cannot_open_is_a_row_with_the_reason(monkeypatch):
    import specd.desktop.drafters.devices as devices

    why = "the Windows ML catalog is not usable (winui3: DLL load failed)"
    monkeypatch.setattr(devices.sys, "platform", "win32")
    rows = devices.probe_ortgenai(None, why)
    row = next(r for r in rows if r.id == devices.WINDOWS_ML_ROW)
    assert (row.available, row.reason, row.kind) == (False, why, "npu")
    assert any(r.id == "onnxruntime-genai:cpu" and r.available for r in rows)
    monkeypatch.setattr(devices.sys, "platform", "linux")
    off_windows = devices.probe_ortgenai(None, "Windows ML exists only on Windows")
    assert devices.WINDOWS_ML_ROW not in {r.id for r in off_windows}
