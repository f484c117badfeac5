"""The tray app's settings: the per-user file over config.toml, the API key store, start on login,
and the dialog that refuses bad values with the reason."""

from __future__ import annotations

import re
import stat
import sys
import tomllib

import pytest

from specd.desktop.drafters.devices import DeviceRow
from specd.desktop.ui.settings_dialog import SettingsDialog
from specd.desktop.ui.user_settings import (
    SecretStore,
    UserSettings,
    autostart_file,
    effective_config,
    read_settings,
    set_start_on_login,
    start_on_login_enabled,
    write_settings,
)
from specd.shared.config import load_config
from specd.shared.errors import ConfigError

ROWS = [DeviceRow("onnxruntime-genai:cpu", "onnxruntime-genai", "cpu", "Test CPU", "cpu", best=True),
        DeviceRow("openvino:CPU", "openvino", "cpu", "Test CPU", "CPU")]


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[client]\nserver_url = "ws://10.0.0.5:8765"\n[sampling]\ntemperature = 0.3\n')
    return path


def test_settings_file_is_toml_that_keeps_odd_strings(tmp_path):
    path = tmp_path / "settings.toml"
    settings = UserSettings(layer={"client": {"server_url": 'wss://h:1/"q"\\x\té', "tls_verify": False},
                                   "devices": {"gpu": {"device_id": 1}}}).with_desktop(device="openvino:GPU.1")
    write_settings(path, settings)
    assert tomllib.loads(path.read_text())["devices"] == {"gpu": {"device_id": 1}}
    assert read_settings(path) == settings


def test_settings_file_round_trip_and_layering(tmp_path, config_file):
    path = tmp_path / "user" / "settings.toml"
    assert read_settings(path) == UserSettings()
    settings = UserSettings(layer={"sampling": {"top_p": 0.5}, "speculation": {"gamma": 3}}).with_desktop(
        device="openvino:CPU", start_on_login=True, highlight_tokens=False)
    write_settings(path, settings)
    again = read_settings(path)
    assert again == settings
    cfg = effective_config(config_file, again)
    assert cfg.client.server_url == "ws://10.0.0.5:8765"  # from config.toml
    assert cfg.sampling.temperature == 0.3
    assert cfg.sampling.top_p == 0.5  # from the user's layer
    assert cfg.speculation.gamma == 3


def test_a_broken_settings_file_is_named(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text("[desktop]\ncolour = 'red'\n")
    with pytest.raises(ConfigError, match=r"unknown key 'colour' in \[desktop\]"):
        read_settings(path)
    path.write_text("[sampling\n")
    with pytest.raises(ConfigError, match=r"settings\.toml"):
        read_settings(path)


def test_api_key_file_is_private_and_forgettable(tmp_path):
    store = SecretStore(tmp_path, use_keyring=False)
    assert store.load() is None
    store.save("s3cret")
    assert store.load() == "s3cret"
    if sys.platform != "win32":
        assert stat.S_IMODE(store.file.stat().st_mode) == 0o600
    assert "0600" in store.where
    store.save("")
    assert store.load() is None and not store.file.exists()


def test_start_on_login_writes_and_removes_an_xdg_autostart_entry(tmp_path):
    if sys.platform == "win32":
        pytest.skip("Windows uses the HKCU Run key")
    assert not start_on_login_enabled(home_config=tmp_path)
    where = set_start_on_login(True, home_config=tmp_path)
    entry = autostart_file(tmp_path)
    assert where == str(entry) and entry.parent.name == "autostart"
    text = entry.read_text()
    assert "[Desktop Entry]" in text and "Type=Application" in text
    exec_line = next(line for line in text.splitlines() if line.startswith("Exec="))
    assert "specd" in exec_line and exec_line.endswith("--minimized")
    assert start_on_login_enabled(home_config=tmp_path)
    set_start_on_login(False, home_config=tmp_path)
    assert not entry.exists()


def make_dialog(qtbot, config_file, settings=None, api_key=None) -> SettingsDialog:
    dialog = SettingsDialog(base=load_config(config_file), settings=settings or UserSettings(), api_key=api_key,
                            key_store="a file", rows=ROWS, config_path=config_file)
    qtbot.addWidget(dialog)
    return dialog


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("sampling.temperature", "warm", r"\[sampling\] temperature: 'warm' is not a number"),
    ("sampling.temperature", "200", r"temperature: expected `float` <= 100"),
    ("sampling.max_new_tokens", "0", r"max_new_tokens: expected `int` >= 1"),
    ("speculation.gamma", "20", r"gamma = 20 \(in Settings\) exceeds \[speculation\] gamma_max = 16 \(the default\)"),
    ("speculation.gamma", "often", r"is not an integer or \"auto\""),
    ("client.server_url", "http://example.com", r"must start with ws:// or wss://"),
    ("client.server_url", "ws://", r"^Not saved: Server URL: 'ws://' has no host name; e\.g\. ws://127\.0\.0\.1:8765"),
    ("client.server_url", "ws://host:port", r"Server URL: 'ws://host:port' is not a valid URL"),
    ("models.draft", "/nowhere/draft", r"^Not saved: Draft model: model folder .*nowhere.draft does not exist"),
    ("models.draft", "no-such-preset", r"Draft model: unknown model 'no-such-preset'"),
])
def test_dialog_refuses_bad_values_with_the_reason(qtbot, config_file, field, value, reason):
    dialog = make_dialog(qtbot, config_file)
    section, key = field.split(".")
    dialog.edits[(section, key)].setText(value)
    dialog.accept()
    assert dialog.result_settings is None
    assert dialog.result() != SettingsDialog.DialogCode.Accepted
    assert not dialog.error.isHidden()
    assert re.search(reason, dialog.error.text()), dialog.error.text()


def test_dialog_round_trip_keeps_only_changes(qtbot, config_file, tmp_path):
    dialog = make_dialog(qtbot, config_file, api_key="old-key")
    assert dialog.edits[("client", "server_url")].text() == "ws://10.0.0.5:8765"  # config.toml shows through
    assert dialog.edits[("sampling", "temperature")].text() == "0.3"
    dialog.edits[("sampling", "top_k")].setText("40")
    dialog.edits[("speculation", "gamma")].setText("4")
    dialog.checks[("speculation", "pipeline")].setChecked(False)
    dialog.device.setCurrentIndex(dialog.device.findData("openvino:CPU"))
    dialog.highlight.setChecked(False)
    dialog.api_key.setText("new-key")
    dialog.accept()
    result = dialog.result_settings
    assert result is not None and dialog.result_api_key == "new-key"
    assert result.layer == {"sampling": {"top_k": 40}, "speculation": {"gamma": 4, "pipeline": False}}
    assert result.desktop.device == "openvino:CPU" and not result.desktop.highlight_tokens
    path = tmp_path / "settings.toml"
    write_settings(path, result)
    reopened = make_dialog(qtbot, config_file, settings=read_settings(path))
    assert reopened.edits[("sampling", "top_k")].text() == "40"
    assert reopened.edits[("speculation", "gamma")].text() == "4"
    assert not reopened.checks[("speculation", "pipeline")].isChecked()
    assert reopened.device.currentData() == "openvino:CPU"
    # "auto" is accepted again for γ and goes back to config.toml's value (no key in the layer)
    reopened.edits[("speculation", "gamma")].setText("auto")
    reopened.accept()
    assert "gamma" not in reopened.result_settings.layer.get("speculation", {})


def test_dialog_errors_name_the_dialog_not_config_toml(qtbot, config_file):
    dialog = make_dialog(qtbot, config_file)
    dialog.edits[("sampling", "top_p")].setText("2")
    dialog.accept()
    assert dialog.error.text().startswith("Not saved: Settings: [sampling] top_p: expected `float` <= 1.0")
    assert str(config_file) not in dialog.error.text()  # the value came from the dialog, not the file


def test_a_bad_value_in_settings_toml_names_settings_toml(tmp_path, config_file):
    settings = UserSettings(layer={"speculation": {"gamma": 20}})
    with pytest.raises(ConfigError) as caught:
        effective_config(config_file, settings, layer_source=str(tmp_path / "settings.toml"))
    assert str(caught.value) == (f"[speculation] gamma = 20 (in {tmp_path / 'settings.toml'}) exceeds "
                                 "[speculation] gamma_max = 16 (the default)")
    config_file.write_text("[sampling]\ntop_p = 7\n")  # the file itself is wrong: it is the one named
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config_file))}: \[sampling\] top_p"):
        effective_config(config_file, settings, layer_source="settings.toml")


def test_device_field_speaks_plain_words(qtbot, config_file):
    dialog = make_dialog(qtbot, config_file)
    texts = [dialog.device.itemText(i) for i in range(dialog.device.count())]
    assert texts[0] == "Default: automatic (best available: NPU, then GPU, then CPU), as the config file says"
    assert not any("[devices]" in text or "edge_device" in text for text in texts)
    assert "Automatic (best available: NPU, then GPU, then CPU)" in texts and "NPU" in texts
