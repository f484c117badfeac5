"""The tray app object offscreen: the Device menu from probe rows, the device choice surviving a
restart, the no-tray path, single instance, error hooks and the screenshot command."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid

import pytest
from PySide6.QtGui import QImage

from specd.desktop.drafters.devices import DeviceRow, probe_devices
from specd.desktop.ui.app import main
from specd.desktop.ui.app_runtime import SingleInstance, install_exception_hooks
from specd.desktop.ui.controller import DesktopApp
from specd.desktop.ui.tray_menu import TrayMenu
from specd.desktop.ui.user_settings import SecretStore, read_settings
from tests.tiny_models import save_tiny_model

ROWS = [
    DeviceRow("openvino:NPU", "openvino", "npu", "Intel AI Boost", "NPU", best=True),
    DeviceRow("torch:cuda:0", "torch", "gpu", "NVIDIA RTX 4060 Laptop GPU", "cuda:0", memory_bytes=8 * 2**30,
              available=False, reason="this torch is a CPU-only build; install a CUDA build of torch"),
    DeviceRow("onnxruntime-genai:cpu", "onnxruntime-genai", "cpu", "Intel Core Ultra 7", "cpu"),
]


def test_device_menu_is_built_from_probe_rows(qtbot):
    menu = TrayMenu()
    qtbot.addWidget(menu)
    menu.set_devices(ROWS, "onnxruntime-genai:cpu")
    actions = menu.device_actions
    assert list(actions) == ["auto", "openvino:NPU", "torch:cuda:0", "onnxruntime-genai:cpu"]
    assert actions["openvino:NPU"].text() == "Intel AI Boost — openvino (best)"  # ★ is for the one in use
    gpu = actions["torch:cuda:0"]
    assert not gpu.isEnabled() and "CPU-only build" in gpu.text() and "CPU-only build" in gpu.toolTip()
    assert "8.0 GiB" in gpu.text()
    assert actions["onnxruntime-genai:cpu"].isChecked() and menu.active_device() == "onnxruntime-genai:cpu"
    assert sum(a.isChecked() for a in actions.values()) == 1
    picked = []
    menu.device_picked.connect(picked.append)
    actions["openvino:NPU"].trigger()
    assert picked == ["openvino:NPU"] and menu.active_device() == "openvino:NPU"
    menu.set_active_device("auto")  # Automatic picked, running on the NPU: the tick and the star differ
    menu.set_running_device("openvino:NPU")
    assert menu.active_device() == "auto" and actions["auto"].isChecked()
    assert actions["openvino:NPU"].text() == "★ Intel AI Boost — openvino (best)"
    assert not any(a.text().startswith("★") for rid, a in actions.items() if rid != "openvino:NPU")
    menu.set_devices(ROWS, "auto")  # a new probe keeps the star on the running device
    assert menu.device_actions["openvino:NPU"].text().startswith("★ ") and menu.active_device() == "auto"
    texts = [a.text() for a in menu.actions()]
    assert texts[0] == "Open chat" and "Device" in texts and texts[-1] == "Quit"
    assert {"Settings…", "View logs"} <= set(texts)


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "draft", seed=2)


def write_config(folder, draft, url="ws://127.0.0.1:9", **sampling):
    path = folder / "config.toml"
    extra = "".join(f"{k} = {v}\n" for k, v in sampling.items())
    path.write_text(f'[client]\nserver_url = "{url}"\nconnect_timeout_s = 2.0\nreconnect_max_s = 0.5\n'
                    f'[models]\ndraft = "{draft}"\ndraft_backend = "torch"\n'
                    f"[sampling]\n{extra}")
    return path


def make_app(tmp_path, config_path, **kwargs) -> DesktopApp:
    return DesktopApp(config_path=config_path, settings_folder=tmp_path / "user",
                      secrets=SecretStore(tmp_path / "user", use_keyring=False), autostart_home=tmp_path / "xdg",
                      on_quit=lambda: None, **kwargs)


def test_device_choice_survives_a_restart(qtbot, qloop, tmp_path, draft_folder):
    config_path = write_config(tmp_path, draft_folder)
    first = make_app(tmp_path, config_path)
    qtbot.addWidget(first.window)
    qloop.run_until_complete(first.start())
    assert first.client is not None and first.setup.choice.row.id == "torch:cpu"
    assert [r.id for r in first.rows] == [r.id for r in probe_devices(first.config)]
    assert first.menu.active_device() == "auto" and first.menu.running == "torch:cpu"  # picked · in use
    assert first.menu.device_actions["torch:cpu"].text().startswith("★ ")
    assert first.state == "offline"  # nothing listens on port 9: the app starts anyway, offline
    assert first.menu.status_action.text().startswith("Reconnecting in ")
    assert "connection refused" in first.menu.status_action.text()
    assert "127.0.0.1:9" in first.window.status_label.full_text
    qloop.run_until_complete(first.pick_device("torch:cpu"))
    assert read_settings(tmp_path / "user" / "settings.toml").desktop.device == "torch:cpu"
    qloop.run_until_complete(first.shutdown())
    assert first.client is None

    second = make_app(tmp_path, config_path)  # a restart of the app object
    qtbot.addWidget(second.window)
    assert second.requested_device == "torch:cpu"
    qloop.run_until_complete(second.start())
    assert second.menu.active_device() == "torch:cpu" and second.setup.choice.requested == "torch:cpu"
    qloop.run_until_complete(second.pick_device("auto"))
    qloop.run_until_complete(second.shutdown())
    assert read_settings(tmp_path / "user" / "settings.toml").desktop.device == "auto"


def test_without_a_tray_the_window_is_the_app(qtbot, qapp, qloop, tmp_path, draft_folder):
    qapp.setQuitOnLastWindowClosed(False)  # as run_app sets it: the app quits itself after shutdown
    app = make_app(tmp_path, write_config(tmp_path, draft_folder), use_tray=True)  # offscreen has no tray
    qtbot.addWidget(app.window)
    assert app.tray is None and not app.window.hide_on_close
    app.window.show()

    async def close_window():
        app.window.close()  # closing the window quits: shutdown runs
        await asyncio.wait_for(app.closed.wait(), 5)

    try:
        qloop.run_until_complete(close_window())
    finally:
        qapp.setQuitOnLastWindowClosed(True)
    assert app.closed.is_set() and not app.window.isVisible()


def test_a_second_launch_brings_the_first_forward(qtbot):
    name = f"specd-test-{uuid.uuid4().hex[:8]}"
    first = SingleInstance(name)
    assert first.claim()
    try:
        with qtbot.waitSignal(first.activated, timeout=3000):
            assert not SingleInstance(name).claim()
    finally:
        first.release()
    again = SingleInstance(name)
    assert again.claim()  # the name is free once the first one is gone
    again.release()


def test_uncaught_exceptions_are_logged_and_shown(qloop, caplog):
    shown = []
    old_hook = sys.excepthook
    install_exception_hooks(lambda title, text, details: shown.append((title, text, details)), qloop)
    try:
        with caplog.at_level(logging.ERROR, logger="specd.desktop"):
            try:
                raise ValueError("boom in a slot")
            except ValueError:
                sys.excepthook(*sys.exc_info())

            async def failing():
                raise RuntimeError("boom in a task")

            task = qloop.create_task(failing())
            qloop.run_until_complete(asyncio.sleep(0.05))
            del task
            import gc

            gc.collect()
            qloop.run_until_complete(asyncio.sleep(0.05))
    finally:
        sys.excepthook = old_hook
        qloop.set_exception_handler(None)
    assert shown[0][1] == "ValueError: boom in a slot" and "Traceback" in shown[0][2]
    assert any(text == "RuntimeError: boom in a task" for _t, text, _d in shown)
    assert "boom in a slot" in caplog.text and "boom in a task" in caplog.text


def test_screenshot_renders_the_sample_conversation(qapp, tmp_path, capsys):
    path = tmp_path / "shots" / "chat.png"
    assert main(["--screenshot", str(path)]) == 0
    image = QImage(str(path))
    assert not image.isNull() and image.width() >= 600 and image.height() >= 400
    colours = {image.pixelColor(x, y).name() for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert "#dcf2dc" in colours and "#fde3c0" in colours  # drafted and corrected tokens are tinted
    assert "wrote" in capsys.readouterr().out


def test_screenshot_of_the_reconnecting_window(qapp, tmp_path):
    from specd.desktop.ui.chat_window import ChatWindow
    from specd.desktop.ui.screenshot import fill_reconnecting

    path = tmp_path / "reconnecting.png"
    assert main(["--screenshot", str(path), "--sample", "reconnecting"]) == 0
    image = QImage(str(path))
    colours = {image.pixelColor(x, y).name() for x in range(0, image.width(), 5) for y in range(0, image.height(), 5)}
    assert "#dbe7fb" in colours  # the last answer went on locally
    window = ChatWindow()  # what the picture shows in its status bar
    fill_reconnecting(window)
    assert window.status_label.full_text.startswith("Reconnecting in 4 s… — cannot reach the verifier at ")
    assert window.latency_label.text() == "" and "drafted locally" in window.stats.text()
    window.close()


def test_model_preparation_progress_reaches_the_window(qtbot, qloop, tmp_path, draft_folder):
    from specd.desktop.commands.launch import build_client

    def build(config, *, device=None, progress=None):  # the real builder, announcing one more step first
        progress("Preparing the draft model of the test")
        return build_client(config, device=device, progress=progress)

    app = make_app(tmp_path, write_config(tmp_path, draft_folder), build=build)
    qtbot.addWidget(app.window)
    shown = []
    original = app.window.show_progress
    app.window.show_progress = lambda message: (shown.append(message), original(message))
    qloop.run_until_complete(app.start())
    assert "Looking for devices…" in shown and "Preparing the draft model of the test" in shown
    assert shown[-1] is None and app.window.progress.isHidden()  # the bar goes away once ready
    qloop.run_until_complete(app.shutdown())


def test_settings_apply_persist_and_rebuild_the_client(qtbot, qapp, qloop, tmp_path, draft_folder):
    qapp.setQuitOnLastWindowClosed(False)  # as run_app sets it: closing the dialog must not quit
    app = make_app(tmp_path, write_config(tmp_path, draft_folder))
    qtbot.addWidget(app.window)
    qloop.run_until_complete(app.start())
    old_client = app.client

    async def change_settings():
        dialog = app.open_settings()
        dialog.edits[("client", "server_url")].setText("ws://127.0.0.1:10")
        dialog.edits[("sampling", "max_new_tokens")].setText("77")
        dialog.api_key.setText("key-from-the-dialog")
        dialog.start_on_login.setChecked(True)
        dialog.accept()
        while app.client is None or app.client is old_client:
            await asyncio.sleep(0.02)

    qloop.run_until_complete(asyncio.wait_for(change_settings(), 60))
    saved = read_settings(tmp_path / "user" / "settings.toml")
    assert saved.layer == {"client": {"server_url": "ws://127.0.0.1:10"}, "sampling": {"max_new_tokens": 77}}
    assert saved.desktop.start_on_login and (tmp_path / "xdg" / "autostart" / "specd-desktop.desktop").is_file()
    assert app.secrets.load() == "key-from-the-dialog"
    assert app.client.endpoint.url == "ws://127.0.0.1:10" and app.client.endpoint.api_key == "key-from-the-dialog"
    assert app.setup.settings.max_new_tokens == 77
    qloop.run_until_complete(app.shutdown())
    qapp.setQuitOnLastWindowClosed(True)
