"""The status bar's busy indicator ends when the work ends, even when a worker thread's last step
reaches the Qt thread after that (``call_soon_threadsafe`` delivers it late)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from specd.desktop.ui.chat_window import ChatWindow
from specd.desktop.ui.controller import DesktopApp
from specd.desktop.ui.progress import ProgressBoard
from specd.desktop.ui.user_settings import SecretStore
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "draft", seed=2)


def test_a_step_posted_after_the_work_ended_does_not_bring_the_bar_back(qtbot, qloop):
    window = ChatWindow()
    qtbot.addWidget(window)
    window.set_status("Connected · verifier:8765 · CPU (torch)")
    board = ProgressBoard(window.show_progress)

    async def scenario():
        span = board.begin("Preparing the draft model…")
        assert window.progress.isVisibleTo(window) and window.status_label.full_text == "Preparing the draft model…"
        span.post("Draft precision: int8, measured fastest")  # queued: arrives after end()
        span.end()
        await asyncio.sleep(0.05)

    qloop.run_until_complete(scenario())
    assert window.progress.isHidden()
    assert window.status_label.full_text == "Connected · verifier:8765 · CPU (torch)"


def test_overlapping_work_keeps_the_bar_until_the_last_ends(qtbot, qloop):
    window = ChatWindow()
    qtbot.addWidget(window)
    board = ProgressBoard(window.show_progress)

    async def scenario():
        first = board.begin("Looking for devices…")
        second = board.begin("Preparing the draft model…")
        first.end()
        assert not window.progress.isHidden()  # the second is still running
        second.post("Building int8")
        await asyncio.sleep(0.02)
        assert window.status_label.full_text == "Building int8"
        second.end()
        second.end()  # ending twice is harmless

    qloop.run_until_complete(scenario())
    assert window.progress.isHidden() and not board.busy


def test_the_app_hides_the_bar_although_the_builder_posts_late(qtbot, qloop, tmp_path, draft_folder):
    """The real app and client builder; the builder's thread leaves a helper that posts one more step after
    the build returned, as a slow logger or a measurement thread does."""
    from specd.desktop.commands.launch import build_client

    late_posted = threading.Event()

    def build(config, *, device=None, progress=None):
        setup = build_client(config, device=device, progress=progress)

        def late():
            progress("Draft precision: int8, measured fastest")
            late_posted.set()

        threading.Timer(0.2, late).start()
        return setup

    config = tmp_path / "config.toml"
    config.write_text(f'[client]\nserver_url = "ws://127.0.0.1:9"\nconnect_timeout_s = 1.0\nreconnect_max_s = 0.5\n'
                      f'[models]\ndraft = "{draft_folder}"\ndraft_backend = "torch"\n')
    app = DesktopApp(config_path=config, settings_folder=tmp_path / "user",
                     secrets=SecretStore(tmp_path / "user", use_keyring=False), use_tray=False,
                     on_quit=lambda: None, build=build)
    qtbot.addWidget(app.window)

    async def scenario():
        await app.start()
        while not late_posted.is_set():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the late step has reached the loop by now
        hidden, line = app.window.progress.isHidden(), app.window.status_label.full_text
        await app.shutdown()
        return hidden, line

    hidden, line = qloop.run_until_complete(asyncio.wait_for(scenario(), 60))
    assert hidden
    assert "Draft precision" not in line and ("Offline" in line or "Reconnecting" in line), line
