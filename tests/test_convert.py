"""``specd convert`` and the cached draft builds behind the loader."""

from __future__ import annotations

import json

import pytest
import torch

from specd.desktop.cli import main
from specd.desktop.drafters.convert import prepare_draft
from specd.desktop.drafters.openvino import OpenVINODrafter
from tests.test_draft_precision import check_ortgenai_weights
from tests.tiny_models import save_tiny_ort_model


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return save_tiny_ort_model(tmp_path_factory.mktemp("tiny-convert") / "hf", seed=5)


def run_draft(drafter) -> torch.Tensor:
    drafter.prefill([1, 4, 9, 16, 25])
    drafter.append([int(drafter.next_logits().argmax())])
    return drafter.next_logits()


def test_convert_onnxruntime_genai_int4_with_progress(tiny_hf, tmp_path, capsys):
    out = tmp_path / "ort-int4"
    code = main(["convert", "--backend", "onnxruntime-genai", "--precision", "int4", "--model", str(tiny_hf),
                 "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "Building the int4 ONNX Runtime GenAI model" in captured.err and "done in" in captured.err
    assert "start to quantize" not in captured.err  # the builder's own INFO log stays hidden
    assert f'draft = "{out}"' in captured.out
    assert (out / "genai_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".ort-int4-*"))  # built beside the destination, then renamed
    check_ortgenai_weights(out, tiny_hf, "int4")  # every projection stored as 4-bit blocks


def test_convert_openvino_int4_writes_symmetric_compressed_weights(tiny_hf, tmp_path, capsys):
    out = tmp_path / "ov-int4"
    assert main(["convert", "--backend", "openvino", "--precision", "int4", "--model", str(tiny_hf),
                 "--out", str(out)]) == 0
    assert "Compressing the weights to symmetric int4" in capsys.readouterr().err
    info = json.loads((out / "specd_export.json").read_text())
    assert info["precision"] == "int4"
    xml = (out / "openvino_model.xml").read_text()
    assert 'element_type="i4"' in xml and 'element_type="i8"' in xml  # blocks int4, embedding/head int8
    assert "ReadValue" in xml and "Assign" in xml  # the KV cache is state
    logits = run_draft(OpenVINODrafter(out))
    assert logits.shape == (64,) and bool(torch.isfinite(logits).all())


def test_convert_refuses_a_non_empty_output_folder(tiny_hf, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("mine")
    code = main(["convert", "--backend", "openvino", "--model", str(tiny_hf), "--out", str(tmp_path / "taken")])
    assert code == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "file.txt").read_text() == "mine"


def test_convert_explains_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["convert", "--backend", "onnxruntime-genai", "--model", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "out")])
    assert code == 1
    assert "not a Hugging Face model folder" in capsys.readouterr().err


def test_prepared_drafts_are_built_once_and_cached(tiny_hf, tmp_path, monkeypatch):
    import specd.desktop.drafters.openvino_export as openvino_export

    builds: list[str] = []
    real_export = openvino_export.export_openvino

    def counted_export(hf_folder, out, precision, say):
        builds.append(precision)
        return real_export(hf_folder, out, precision, say)

    monkeypatch.setattr(openvino_export, "export_openvino", counted_export)
    messages: list[str] = []
    first = prepare_draft(str(tiny_hf), "openvino", "int8", cache_override=str(tmp_path), progress=messages.append)
    assert (first / ".complete").is_file() and any("once" in m for m in messages)
    assert builds == ["int8"]
    again = prepare_draft(str(tiny_hf), "openvino", "int8", cache_override=str(tmp_path), progress=messages.append)
    assert again == first and builds == ["int8"]  # the cached build is used, not rebuilt
    # No temporary folders left behind; the build's lock file stays (shared.folder_lock says why).
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name, f"{first.name}.lock"]
    # A folder that already is a model for the backend is used as it is.
    assert prepare_draft(str(first), "openvino", "int8", cache_override=str(tmp_path)) == first
    assert builds == ["int8"]
