"""The tray app against a real verifier on 127.0.0.1 (tiny models): a prompt streams into the view,
Stop cancels, and losing the verifier is shown and notified while the draft model goes on locally."""

from __future__ import annotations

import asyncio

import pytest

from specd.daemon.server import Verifier
from specd.desktop.ui.controller import DesktopApp
from specd.desktop.ui.user_settings import SecretStore
from specd.shared.config import load_config
from tests.tiny_models import save_tiny_model

PROMPT = "w5 w9 w12 w30"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"target": save_tiny_model(root / "target", seed=1), "draft": save_tiny_model(root / "draft", seed=2)}


def start_app(tmp_path, qtbot, folders, url: str, max_new_tokens: int = 24) -> DesktopApp:
    config = tmp_path / "config.toml"
    config.write_text(f'[client]\nserver_url = "{url}"\nconnect_timeout_s = 3.0\nreconnect_max_s = 0.5\n'
                      f'[models]\ndraft = "{folders["draft"]}"\ndraft_backend = "torch"\n'
                      f"[sampling]\ntemperature = 0.0\nmax_new_tokens = {max_new_tokens}\n")
    app = DesktopApp(config_path=config, settings_folder=tmp_path / "user",
                     secrets=SecretStore(tmp_path / "user", use_keyring=False), on_quit=lambda: None)
    qtbot.addWidget(app.window)
    app.window.show()
    return app


def spy_pieces(app: DesktopApp, on_first=None) -> list[tuple[str, str, str]]:
    """Record each streamed piece with what the view showed right after it."""
    seen: list[tuple[str, str, str]] = []
    original = app.window.append_piece

    def record(text: str, source: str) -> None:
        original(text, source)
        app.window.refresh(now=True)
        seen.append((text, source, app.window.plain_text()))
        if on_first is not None and len(seen) == 1:
            on_first()

    app.window.append_piece = record
    return seen


def verifier_config(target):
    return load_config(None, overrides={"models": {"target": str(target)}, "server": {"port": 0}})


def test_a_prompt_streams_into_the_view(qtbot, qloop, tmp_path, folders):
    async def scenario():
        async with Verifier(verifier_config(folders["target"])) as verifier:
            app = start_app(tmp_path, qtbot, folders, verifier.url)
            await app.start()
            assert app.state == "connected" and "Connected" in app.window.status_label.text()
            assert "handshake" in app.window.latency_label.text()
            seen = spy_pieces(app)
            app.window.prompt.setPlainText(PROMPT)
            app.window.send_button.click()  # the real button: the window emits, the app spawns the answer
            await asyncio.sleep(0)
            assert app.window.stop_button.isEnabled() and not app.window.send_button.isEnabled()
            while app._answer_task is not None or not app.conversation or app.conversation[-1]["role"] != "assistant":
                await asyncio.sleep(0.02)
            await app.shutdown()
            return app, seen

    app, seen = qloop.run_until_complete(asyncio.wait_for(scenario(), 120))
    answer = app.conversation[-1]["content"]
    assert app.conversation[0] == {"role": "user", "content": PROMPT}
    assert len(seen) >= 2 and answer  # streamed in several pieces
    assert "".join(text for text, _s, _v in seen) == answer
    assert seen[0][2].count(seen[0][0].strip()) >= 1  # the first piece was visible before the answer finished
    # Rounds, and stretches the verifier streams alone where that is faster (the tiny target is quick).
    assert {source for _t, source, _v in seen} <= {"draft", "target", "cloud"}
    view = app.window.plain_text()
    assert PROMPT in view and answer.strip().split()[-1] in view
    stats = app.window.stats.text()
    assert "tok/s" in stats and "acceptance" in stats and "speculative" in stats and "cpu (torch, fp32)" in stats
    assert app.window.send_button.isEnabled() and not app.window.stop_button.isEnabled()


def test_stop_cancels_the_answer(qtbot, qloop, tmp_path, folders):
    async def scenario():
        async with Verifier(verifier_config(folders["target"])) as verifier:
            app = start_app(tmp_path, qtbot, folders, verifier.url, max_new_tokens=400)
            await app.start()
            seen = spy_pieces(app, on_first=app.window.stop_button.click)
            await app.send(PROMPT)
            await app.shutdown()
            return app, seen

    app, seen = qloop.run_until_complete(asyncio.wait_for(scenario(), 120))
    assert seen
    assert "cancelled" in app.window.stats.text()
    tokens = int(app.window.stats.text().split(" tokens")[0])
    assert 0 < tokens < 400


def test_losing_the_verifier_is_notified_and_the_draft_goes_on(qtbot, qloop, tmp_path, folders):
    async def scenario():
        verifier = Verifier(verifier_config(folders["target"]))
        await verifier.start()
        try:
            app = start_app(tmp_path, qtbot, folders, verifier.url, max_new_tokens=12)
            await app.start()
            assert app.state == "connected"
        finally:
            await verifier.stop()
        await app.send(PROMPT)
        await app.shutdown()
        return app

    app = qloop.run_until_complete(asyncio.wait_for(scenario(), 120))
    assert app.conversation[-1]["role"] == "assistant" and app.conversation[-1]["content"]
    assert ("Connection lost" in [title for title, _m in app.notifications])
    assert "local" in app.window.stats.text()
