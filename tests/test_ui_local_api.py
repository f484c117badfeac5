"""The tray app's Local API: off by default, switched on in Settings, its URL in the tray menu with a Copy
entry, the requests it is answering counted in the status line, and off again."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from specd.desktop.drafters.torch_drafter import TorchDrafter
from specd.desktop.ui.controller import DesktopApp
from specd.desktop.ui.user_settings import SecretStore, read_settings
from tests.serve_support import raw_http
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "draft", seed=2)


def test_the_local_api_is_switched_on_in_settings_shown_counted_and_off_again(qtbot, qapp, qloop, tmp_path,
                                                                               draft_folder, monkeypatch):
    slow = TorchDrafter.next_logits

    def next_logits(self, ahead=()):  # a laptop-slow draft model, so a request is still running when it is counted
        time.sleep(0.01)
        return slow(self, ahead)

    monkeypatch.setattr(TorchDrafter, "next_logits", next_logits)
    qapp.setQuitOnLastWindowClosed(False)
    config = tmp_path / "config.toml"
    config.write_text(f'[client]\nserver_url = "ws://127.0.0.1:9"\nconnect_timeout_s = 1.0\nreconnect_max_s = 0.5\n'
                      f'[models]\ndraft = "{draft_folder}"\ndraft_backend = "torch"\n'
                      f'[api]\nport = 0\napi_key_env = ""\n', encoding="utf-8")
    app = DesktopApp(config_path=config, settings_folder=tmp_path / "user",
                     secrets=SecretStore(tmp_path / "user", use_keyring=False), autostart_home=tmp_path / "xdg",
                     on_quit=lambda: None)
    qtbot.addWidget(app.window)
    qloop.run_until_complete(app.start())
    assert app.local_api.api is None and app.menu.api_action.text() == "Local API: off (Settings…)"
    assert not app.menu.copy_api_action.isVisible() and "Local API" not in app.status_text()

    async def switch(on: bool) -> None:
        dialog = app.open_settings()
        assert dialog.local_api.isChecked() is not on
        dialog.local_api.setChecked(on)
        dialog.accept()
        while app.menu.copy_api_action.isVisible() is not on:  # the menu follows once it has started or stopped
            await asyncio.sleep(0.02)

    qloop.run_until_complete(asyncio.wait_for(switch(True), 60))
    assert read_settings(tmp_path / "user" / "settings.toml").desktop.local_api
    url = app.local_api.url
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    assert app.menu.api_action.text() == f"Local API: {url}" and app.menu.copy_api_action.isVisible()
    app.menu.copy_api_action.trigger()
    assert qapp.clipboard().text() == url
    assert "Local API: 0 in flight" in app.status_text()

    async def ask_and_count() -> tuple[int, bytes, str]:
        base = url.removesuffix("/v1")
        request = asyncio.ensure_future(raw_http(base, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "w5 w6"}], "temperature": 0, "max_tokens": 60}))
        while app.local_api.in_flight == 0:
            await asyncio.sleep(0.005)
        counted = app.menu.status_action.text()
        status, _headers, payload = await request
        return status, payload, counted

    status, payload, counted = qloop.run_until_complete(asyncio.wait_for(ask_and_count(), 60))
    assert "Local API: 1 in flight" in counted
    answer = json.loads(payload)
    assert status == 200 and answer["choices"][0]["message"]["content"] and answer["specd"]["mode"] == "local"
    assert "Local API: 0 in flight" in app.menu.status_action.text()

    qloop.run_until_complete(asyncio.wait_for(switch(False), 60))
    assert app.menu.api_action.text() == "Local API: off (Settings…)" and not app.menu.copy_api_action.isVisible()
    qloop.run_until_complete(app.shutdown())
    qapp.setQuitOnLastWindowClosed(True)
