"""The tray app's wiring through its real entry points: one instance per user through ``app.py``, and
the API key's precedence (OS keyring, then the environment, then ``[client] api_key_file``) through the
app's client set-up, against a verifier that checks the key."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import uuid

import keyring
import keyring.backend
import pytest

from specd.daemon.server import Verifier
from specd.desktop.ui import app_runtime, controller
from specd.desktop.ui.app import main as app_main
from specd.desktop.ui.app_runtime import SingleInstance
from specd.desktop.ui.controller import DesktopApp
from specd.desktop.ui.user_settings import KEYRING_SERVICE, KEYRING_USER, SecretStore
from tests.daemon_support import daemon_config
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("wiring") / "tiny", seed=1)


# -- one instance per user, through app.py --------------------------------------------------------
@pytest.fixture
def instance_user(monkeypatch, tmp_path):
    """A user name of its own, so the instance socket is not a real user's; logs go to tmp_path."""
    user = f"specdtest{uuid.uuid4().hex[:10]}"
    monkeypatch.setattr(app_runtime, "_user", lambda: user)
    monkeypatch.setattr(app_runtime, "log_dir", lambda: tmp_path / "logs")
    handlers = list(logging.getLogger().handlers)
    yield user
    for handler in logging.getLogger().handlers[len(handlers):]:  # what setup_logging added
        logging.getLogger().removeHandler(handler)
        handler.close()


@pytest.fixture
def no_second_app(monkeypatch):
    """A second launch in this process must stop before it builds an app (which would run until quit)."""
    def refuse(**_kwargs):
        raise AssertionError("a second launch must not build the app")

    monkeypatch.setattr(controller, "DesktopApp", refuse)


def test_a_second_launch_through_the_app_brings_the_first_forward_and_exits(qtbot, instance_user, no_second_app,
                                                                              capsys):
    first = SingleInstance()
    assert first.name == f"specd-desktop-{instance_user}" and first.claim()
    try:
        with qtbot.waitSignal(first.activated, timeout=10000):
            assert app_main(["--no-tray"]) == 0
    finally:
        first.release()
    assert "already running" in capsys.readouterr().out


@pytest.mark.slow
def test_the_app_holds_the_instance_while_it_runs_and_frees_it_on_quit(qtbot, instance_user, no_second_app,
                                                                      tmp_path, tiny_folder, capsys):
    """A real ``specd-desktop`` process claims the user's instance: a second launch exits at once; after
    the first quits (SIGTERM, as at log out) the name is free again."""
    config = tmp_path / "config.toml"
    config.write_text(f'[client]\nserver_url = "ws://127.0.0.1:9"\nconnect_timeout_s = 1.0\n'
                      f'[models]\ndraft = "{tiny_folder}"\ndraft_backend = "torch"\n', encoding="utf-8")
    home = tmp_path / "home"
    log_file = home / "state" / "specd" / "log" / "specd-desktop.log"
    env = dict(os.environ, LOGNAME=instance_user, USER=instance_user, QT_QPA_PLATFORM="offscreen",
               XDG_CONFIG_HOME=str(home / "config"), XDG_STATE_HOME=str(home / "state"),
               XDG_DATA_HOME=str(home / "data"))
    first = subprocess.Popen([sys.executable, "-m", "specd.desktop.ui.app", "--no-tray", "--config", str(config)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        probe = SingleInstance()  # the name app.py computes for this user
        listening = False
        for _ in range(600):  # until the first app listens (start-up loads torch and Qt)
            assert first.poll() is None, first.communicate()
            from PySide6.QtNetwork import QLocalSocket

            socket = QLocalSocket()
            socket.connectToServer(probe.name)
            if socket.waitForConnected(100):
                socket.disconnectFromServer()
                listening = True
                break
            qtbot.wait(100)
        assert listening, "the first app never claimed the instance"
        assert app_main(["--no-tray", "--config", str(config)]) == 0
        assert "already running" in capsys.readouterr().out
        for _ in range(1200):  # until it has tried the verifier: running its loop, signal handlers set
            assert first.poll() is None, first.communicate()
            if log_file.is_file() and "cannot connect" in log_file.read_text(encoding="utf-8"):
                break
            qtbot.wait(100)
        first.send_signal(signal.SIGTERM)
        _out, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    log = log_file.read_text(encoding="utf-8")
    assert "starting" in log and "signal 15: quitting" in log and "specd-desktop stopped" in log
    again = SingleInstance()
    assert again.claim()  # freed by the first app on its way out
    again.release()


# -- the API key: keyring over environment over file ------------------------------------------------
class MemoryKeyring(keyring.backend.KeyringBackend):
    """The OS keyring's interface over a dict (there is no keyring service on a test machine)."""

    priority = 1

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.secrets.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.secrets[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.secrets.pop((service, username), None)


@pytest.fixture
def memory_keyring():
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


@pytest.mark.parametrize(("in_keyring", "in_env", "in_file", "winner"), [
    ("key-from-keyring", "key-from-env", "key-from-file", "key-from-keyring"),
    (None, "key-from-env", "key-from-file", "key-from-env"),
    (None, None, "key-from-file", "key-from-file"),
])
def test_the_api_key_comes_from_the_keyring_then_the_environment_then_the_file(
        qtbot, qloop, tmp_path, tiny_folder, memory_keyring, monkeypatch, in_keyring, in_env, in_file, winner):
    if in_keyring:
        memory_keyring.set_password(KEYRING_SERVICE, KEYRING_USER, in_keyring)
    monkeypatch.delenv("SPECD_TEST_API_KEY", raising=False)
    if in_env:
        monkeypatch.setenv("SPECD_TEST_API_KEY", in_env)
    key_file = tmp_path / "api_key.txt"
    key_file.write_text(f"{in_file}\n", encoding="utf-8")
    secrets = SecretStore(tmp_path / "user")
    assert secrets.keyring is memory_keyring  # the store really uses the (fake) OS keyring

    async def scenario():
        # The verifier accepts only the key that should win: a connection proves which one was sent.
        async with Verifier(daemon_config(tiny_folder), api_key=winner) as verifier:
            config = tmp_path / "config.toml"
            config.write_text(f'[client]\nserver_url = "{verifier.url}"\nconnect_timeout_s = 5.0\n'
                              f'api_key_env = "SPECD_TEST_API_KEY"\napi_key_file = "{key_file}"\n'
                              f'[models]\ndraft = "{tiny_folder}"\ndraft_backend = "torch"\n', encoding="utf-8")
            app = DesktopApp(config_path=config, settings_folder=tmp_path / "user", secrets=secrets,
                             autostart_home=tmp_path / "xdg", on_quit=lambda: None)
            qtbot.addWidget(app.window)
            await app.start()
            try:
                return app.client.endpoint.api_key, app.state, verifier.metrics.refusals["unauthorized"]
            finally:
                await app.shutdown()

    sent, state, refused = qloop.run_until_complete(asyncio.wait_for(scenario(), 120))
    assert sent == winner
    assert state == "connected" and refused == 0
