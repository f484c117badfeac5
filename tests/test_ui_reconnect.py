"""The tray app reconnects by itself while idle: a real verifier process killed and started again on the
same port, and an app started before its verifier. It says ``Reconnecting in N s…`` and why, in the
status bar, its tooltip and the tray menu, then ``Connected`` with no message sent. A reconnect the app
makes itself (a device pick, Quit) is no outage."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from specd.daemon.server import Verifier
from specd.desktop.ui.controller import DesktopApp
from specd.desktop.ui.user_settings import SecretStore
from specd.shared.config import load_config
from tests.daemon_process import DaemonProcess
from tests.tiny_models import save_tiny_model

PROMPT = "w5 w9 w12 w30"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"target": save_tiny_model(root / "target", seed=1), "draft": save_tiny_model(root / "draft", seed=2)}


def make_app(tmp_path, qtbot, folders, url: str, reconnect_max_s: float = 2.0) -> DesktopApp:
    config = tmp_path / "config.toml"
    config.write_text(f'[client]\nserver_url = "{url}"\nconnect_timeout_s = 3.0\nreconnect_max_s = {reconnect_max_s}\n'
                      f'[models]\ndraft = "{folders["draft"]}"\ndraft_backend = "torch"\n'
                      "[sampling]\ntemperature = 0.0\nmax_new_tokens = 8\n")
    app = DesktopApp(config_path=config, settings_folder=tmp_path / "user",
                     secrets=SecretStore(tmp_path / "user", use_keyring=False), on_quit=lambda: None)
    qtbot.addWidget(app.window)
    app.window.show()
    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StatusLog:
    """Every status line, tooltip and tray status line the app showed, sampled as the test waits."""

    def __init__(self, app: DesktopApp) -> None:
        self.app = app
        self.seen: list[tuple[str, str, str, str]] = []

    def sample(self) -> None:
        w = self.app.window
        entry = (w.status_label.full_text, w.status_label.toolTip(), self.app.menu.status_action.text(),
                 w.latency_label.text())
        if not self.seen or self.seen[-1] != entry:
            self.seen.append(entry)

    async def until(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.sample()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last status: {self.seen[-1:]}")
            await asyncio.sleep(0.05)
        self.sample()


def test_an_idle_app_reconnects_when_the_verifier_restarts(qtbot, qloop, tmp_path, folders):
    daemon = DaemonProcess(folders["target"], tmp_path)
    daemon.start()
    app = make_app(tmp_path, qtbot, folders, daemon.url)
    status = StatusLog(app)
    refused = f"cannot reach the verifier at 127.0.0.1:{daemon.port}: connection refused (is specd-verifier running?)"

    async def scenario():
        await app.start()
        assert app.state == "connected" and app.window.latency_label.text().startswith("handshake")
        await asyncio.to_thread(daemon.stop)  # SIGKILL: no goodbye on the wire
        await status.until(lambda: app.state != "connected", 30, "the loss to be seen")
        await status.until(lambda: "connection refused" in app.status_text(), 30, "a refused reconnect")
        await status.until(lambda: app.status_text().startswith("Reconnecting in 2 s…"), 30, "a 2 s backoff")
        await asyncio.to_thread(daemon.start)  # the same port again
        await status.until(lambda: app.state == "connected", 120, "the idle reconnect")
        await app.send(PROMPT)  # the session it reconnected is a working one
        await app.shutdown()

    try:
        qloop.run_until_complete(asyncio.wait_for(scenario(), 300))
    finally:
        daemon.stop()
    assert app.conversation[0]["content"] == PROMPT and "speculative" in app.window.stats.text()
    waiting = [entry for entry in status.seen if entry[0].startswith("Reconnecting in ") and refused in entry[0]]
    assert waiting, status.seen
    line, tooltip, menu_line, latency = waiting[-1]
    assert "\n" not in line
    assert f"Why: {refused}" in tooltip and "Verifier: ws://127.0.0.1:" in tooltip
    assert menu_line.startswith("Reconnecting in ") and "connection refused" in menu_line
    assert latency == ""  # no stale round-trip figure while offline
    assert {"Reconnecting in 1 s…", "Reconnecting in 2 s…"} <= {e[0].split(" — ")[0] for e in status.seen}
    assert status.seen[-1][0].startswith("Connected · 127.0.0.1:")
    titles = [title for title, _message in app.notifications]
    lost = next(message for title, message in app.notifications if title == "Connection lost")
    assert "the connection dropped (the verifier stopped, or the network failed)" in lost
    assert "close frame" not in lost
    assert titles.index("Connection lost") < titles.index("Connected again")


def test_an_app_started_before_its_verifier_connects_once_it_is_up(qtbot, qloop, tmp_path, folders):
    port = free_port()
    app = make_app(tmp_path, qtbot, folders, f"ws://127.0.0.1:{port}", reconnect_max_s=1.0)
    status = StatusLog(app)
    config = load_config(None, overrides={"models": {"target": str(folders["target"])},
                                          "server": {"host": "127.0.0.1", "port": port}})

    async def scenario():
        await app.start()
        await status.until(lambda: app.status_text().startswith("Reconnecting in 1 s…"), 30, "the countdown")
        assert app.state == "offline" and "connection refused" in app.window.status_label.toolTip()
        async with Verifier(config):
            await status.until(lambda: app.state == "connected", 30, "the first connection")
            assert not app.conversation
            await app.shutdown()

    qloop.run_until_complete(asyncio.wait_for(scenario(), 120))
    assert status.seen[-1][0].startswith("Connected · ") and app.reconnector.state is None
    assert not [title for title, _m in app.notifications if title in ("Connection lost", "Connected again")]


def test_a_deliberate_reconnect_is_not_an_outage(qtbot, qloop, tmp_path, folders, caplog):
    config = load_config(None, overrides={"models": {"target": str(folders["target"])}, "server": {"port": 0}})

    async def scenario():
        async with Verifier(config) as verifier:
            app = make_app(tmp_path, qtbot, folders, verifier.url)
            await app.start()
            assert app.state == "connected"
            await app.pick_device("torch:cpu")
            assert app.state == "connected"
            with caplog.at_level(logging.INFO):
                await app.shutdown()
            return app

    app = qloop.run_until_complete(asyncio.wait_for(scenario(), 120))
    titles = [title for title, _m in app.notifications]
    assert "Connection lost" not in titles and "Connected again" not in titles
    assert ("Device", "Switched to " + app.menu.rows["torch:cpu"].name + " (torch)") in app.notifications
    assert "Connection lost" not in caplog.text and "quitting" in caplog.text


class GatedClient:
    """The one thing the reconnector needs of an edge client: ``connect()``, here held until released,
    so the test decides when a handshake ends (a real one would race the test)."""

    def __init__(self, outcomes: list[Exception | None]) -> None:
        self.reconnect_max_s = 0.2
        self.outcomes = outcomes
        self.calls = 0
        self.release = asyncio.Event()
        self.active = 0
        self.most_active = 0

    async def connect(self):
        self.calls += 1
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            await self.release.wait()
        finally:
            self.active -= 1
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome


def test_pausing_lets_a_handshake_in_flight_finish_and_gives_up_on_a_refusal(qloop):
    from specd.desktop.client.connection import ConnectionFailed
    from specd.desktop.ui.idle_reconnect import IdleReconnector

    async def scenario():
        states = []
        reconnector = IdleReconnector(states.append)
        client = GatedClient([None])
        reconnector.start(client, "lost it")
        while client.active == 0:  # waiting 0.2 s, then the handshake starts and hangs on the gate
            await asyncio.sleep(0.01)
        pausing = asyncio.ensure_future(reconnector.pause())
        await asyncio.sleep(0.05)
        assert not pausing.done()  # an answer must not start its own handshake beside this one
        client.release.set()
        await pausing
        assert states[0].text == "Reconnecting in 1 s…" and states[0].reason == "lost it"
        assert [s.phase for s in states if s] == ["waiting", "trying"] and states[-1] is None
        assert client.calls == 1 and client.most_active == 1 and not reconnector.running

        refused = GatedClient([ConnectionFailed("cannot reach it", retry=True),
                               ConnectionFailed("the verifier requires an API key", retry=False)])
        refused.release.set()
        states.clear()
        reconnector.start(refused, "lost it")
        while reconnector.running:
            await asyncio.sleep(0.01)
        assert refused.calls == 2 and states[-1].phase == "gave_up" and states[-1].text == "Offline"
        assert states[-1].reason == "the verifier requires an API key"
        assert any(s and s.phase == "waiting" and s.reason == "cannot reach it" for s in states)

    qloop.run_until_complete(asyncio.wait_for(scenario(), 30))
