"""What the tray app says about itself: the real state when the draft model cannot be loaded (not
ready, or cloud-only and why) on one status line with the detail in its tooltip, View logs where no
file manager opens the folder, and the wording of the answer stats, legend and dropped connections."""

from __future__ import annotations

import shutil

import pytest
from PySide6.QtWidgets import QApplication
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from specd.desktop.client.connection import plain_close_reason
from specd.desktop.client.stats_line import stats_line
from specd.desktop.ui.app_runtime import LOG_FILE
from specd.desktop.ui.chat_view import legend_html
from specd.desktop.ui.chat_window import ChatWindow
from specd.desktop.ui.controller import DesktopApp
from specd.desktop.ui.user_settings import SecretStore
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def draft_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "draft", seed=2)


def make_app(tmp_path, draft, **kwargs) -> DesktopApp:
    config = tmp_path / "config.toml"
    config.write_text('[client]\nserver_url = "ws://127.0.0.1:9"\nconnect_timeout_s = 2.0\nreconnect_max_s = 0.5\n'
                      f'[models]\ndraft = "{draft}"\ndraft_backend = "torch"\n')
    return DesktopApp(config_path=config, settings_folder=tmp_path / "user",
                      secrets=SecretStore(tmp_path / "user", use_keyring=False), on_quit=lambda: None, **kwargs)


def assert_one_line(window: ChatWindow) -> None:
    label = window.status_label
    assert "\n" not in label.text() and "\n" not in label.full_text
    fresh = ChatWindow()
    fresh.show()
    window.show()
    QApplication.processEvents()
    assert window.statusBar().sizeHint().height() == fresh.statusBar().sizeHint().height()
    assert window.width() == fresh.width()  # a long reason does not widen the window either
    fresh.close()


def test_a_draft_model_that_does_not_exist_says_why_the_app_is_not_ready(qtbot, qloop, tmp_path):
    missing = tmp_path / "no-such-draft"
    app = make_app(tmp_path, missing)
    qtbot.addWidget(app.window)
    qloop.run_until_complete(app.start())
    assert app.client is None
    line = app.window.status_label.full_text
    assert line.startswith("Not ready — cannot prepare the client: ") and str(missing) in line
    assert "does not exist" in app.window.status_label.toolTip()
    assert app.menu.status_action.text().startswith("Not ready — ")
    assert_one_line(app.window)
    qloop.run_until_complete(app.send("hello"))
    error = app.window.turns[-1]
    assert error.role == "error" and error.text.startswith("Cannot answer: cannot prepare the client: ")
    assert "still being prepared" not in error.text and str(missing) in error.text
    qloop.run_until_complete(app.shutdown())


def test_a_draft_model_that_cannot_load_gives_cloud_only_and_why(qtbot, qloop, tmp_path, draft_folder):
    broken = tmp_path / "draft-without-weights"  # the tokenizer is there, the weights are not
    shutil.copytree(draft_folder, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    app = make_app(tmp_path, broken)
    qtbot.addWidget(app.window)
    qloop.run_until_complete(app.start())
    assert app.client is not None and app.client.drafter is None and app.setup.drafter_error
    assert " · cloud-only" in app.window.status_label.full_text
    tooltip = app.window.status_label.toolTip()
    assert "No draft model: answers are cloud-only: no device can run the draft model" in tooltip
    assert "torch:cpu" in tooltip  # the multi-line reason is whole in the tooltip…
    assert_one_line(app.window)  # …and the status bar stays one line
    assert any(title == "No draft model" for title, _m in app.notifications)
    qloop.run_until_complete(app.shutdown())


def test_view_logs_without_a_file_manager_shows_the_log(qtbot, qapp, tmp_path, draft_folder):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / LOG_FILE).write_text("".join(f"2026-01-01 INFO specd: line {i}\n" for i in range(300)))
    opened = []
    app = make_app(tmp_path, draft_folder, log_folder=logs, open_url=lambda url: opened.append(url) or False)
    qtbot.addWidget(app.window)
    dialog = app.view_logs()
    assert dialog is not None and opened[0].toLocalFile() == str(logs)
    qtbot.addWidget(dialog)
    shown = dialog.text.toPlainText().splitlines()
    assert len(shown) == 200 and shown[0].endswith("line 100") and shown[-1].endswith("line 299")
    assert str(logs / LOG_FILE) in dialog.where.text()
    dialog.copy_button.click()
    copied = qapp.clipboard().text()
    assert copied.startswith(str(logs / LOG_FILE) + "\n") and "line 299" in copied and "line 99\n" not in copied

    with_manager = make_app(tmp_path, draft_folder, log_folder=logs, open_url=lambda url: True)
    qtbot.addWidget(with_manager.window)
    assert with_manager.view_logs() is None  # the file manager opened the folder: no dialog


def test_view_logs_before_any_log_was_written(qtbot, tmp_path, draft_folder):
    app = make_app(tmp_path, draft_folder, log_folder=tmp_path / "empty-logs", open_url=lambda url: False)
    qtbot.addWidget(app.window)
    dialog = app.view_logs()
    qtbot.addWidget(dialog)
    assert dialog.text.toPlainText() == f"(no log yet: {tmp_path / 'empty-logs' / LOG_FILE} does not exist)"


def test_answer_stats_and_legend_wording():
    local_only = {"mode": "local", "tokens_per_second": 12.0, "rounds": 0, "local_tokens": 9, "generated": 9,
                  "acceptance_rate": 0.0, "gamma_mean": 0.0, "device": "cpu", "backend": "torch"}
    line = stats_line(local_only, "eos")
    assert "drafted locally" in line and "acceptance" not in line and "γ" not in line
    mixed = {**local_only, "rounds": 3, "acceptance_rate": 0.5, "gamma_mean": 4.0, "local_tokens": 4,
             "tokens_per_forward": 1.5, "generated": 14}
    assert "acceptance 50% · mean γ 4.0 · 1.50 tok/forward · 4 drafted locally" in stats_line(mixed, "eos")
    cloud = {"mode": "cloud-only", "tokens_per_second": 30.0, "generated": 5, "cloud_tokens": 5, "cloud_s": 0.2}
    assert stats_line(cloud, "eos") == "5 tokens · 30.0 tok/s · cloud-only · finish eos"
    switched = {"mode": "speculative", "tokens_per_second": 20.0, "generated": 42, "rounds": 4,
                "acceptance_rate": 0.75, "gamma_mean": 3.0, "tokens_per_forward": 3.0, "speculative_tokens": 12,
                "speculative_s": 0.4, "cloud_tokens": 30, "cloud_s": 1.2}
    assert stats_line(switched, "length") == ("42 tokens · 20.0 tok/s · speculative · acceptance 75% · mean γ 3.0 · "
                                              "3.00 tok/forward · 12 speculative in 0.4 s · 30 cloud in 1.2 s · "
                                              "finish length")
    legend = legend_html()
    assert "from the verifier" in legend and "corrected" not in legend


@pytest.mark.parametrize(("rcvd", "sent", "words"), [
    (None, None, "the connection dropped (the verifier stopped, or the network failed)"),
    (Close(1001, ""), None, "the verifier is shutting down"),
    (Close(1011, "model crashed"), None, "the verifier hit an internal error: model crashed"),
    (None, Close(1011, "keepalive ping timeout"), "the verifier stopped answering"),
    (Close(4000, ""), None, "the verifier closed the connection (code 4000)"),
])
def test_a_closed_connection_is_told_in_plain_words(rcvd, sent, words):
    reason = plain_close_reason(ConnectionClosed(rcvd, sent))
    assert reason == words and "frame" not in reason


def test_view_logs_where_qt_itself_has_no_launcher(qtbot, qapp, tmp_path, draft_folder):
    if qapp.platformName() != "offscreen":
        pytest.skip("only the offscreen platform is known to have no launcher (elsewhere a file manager opens)")
    app = make_app(tmp_path, draft_folder, log_folder=tmp_path / "logs")  # Qt's own QDesktopServices.openUrl
    qtbot.addWidget(app.window)
    dialog = app.view_logs()
    assert dialog is not None and str(tmp_path / "logs" / LOG_FILE) in dialog.where.text()
    qtbot.addWidget(dialog)
