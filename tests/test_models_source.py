"""Model references resolve to presets, hub ids, folders or GGUF files, with clear errors."""

from __future__ import annotations

import pytest

from specd.shared.errors import ModelError
from specd.shared.models import PRESETS, embedded_gguf, ensure_hf_folder, resolve_source


def test_presets_and_hub_ids(tmp_path):
    assert resolve_source("smollm2-135m-instruct").is_embedded
    llama = resolve_source("Llama-3.1-8B-Instruct")
    assert llama.kind == "preset" and PRESETS[llama.ref].gated
    assert resolve_source("meta-llama/Llama-3.2-1B-Instruct").kind == "hub"


def test_folders_and_gguf_files(tmp_path):
    assert resolve_source(str(tmp_path)).kind == "folder"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)).kind == "gguf"


@pytest.mark.parametrize("spec,message", [
    ("", "no model given"),
    ("./missing-folder", "does not exist"),
    ("/nowhere/x.gguf", "does not exist"),
    ("not a model", "unknown model"),
])
def test_bad_references_say_what_is_allowed(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve_source(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match=r"no config\.json"):
        ensure_hf_folder(str(tmp_path))


def test_hub_model_offline_and_uncached_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="offline"):
        ensure_hf_folder("specd-test/does-not-exist")


def test_the_embedded_gguf_ships_in_the_wheel():
    path = embedded_gguf()
    assert path is not None and path.suffix == ".gguf" and path.stat().st_size > 50_000_000
