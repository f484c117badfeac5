"""``specd-desktop``: the tray app (PySide6 on a qasync event loop)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

from specd.shared import __version__

log = logging.getLogger("specd.desktop")
ICON_DIR = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specd-desktop", description="specd tray app: chat through the verifier "
                                     "with a draft model on this laptop's NPU, GPU or CPU.")
    parser.add_argument("--version", action="version", version=f"specd-desktop {__version__}")
    parser.add_argument("--config", help="config file (default: $SPECD_CONFIG, ./config.toml, the user's); the "
                                         "app's own settings.toml is layered over it")
    parser.add_argument("--screenshot", metavar="PATH", help="render the chat window with a sample "
                                                             "conversation to a PNG offscreen and exit")
    parser.add_argument("--sample", choices=("answered", "reconnecting"), default="answered",
                        help="with --screenshot: the conversation answered (default), or the window after "
                             "the verifier went away, reconnecting")
    parser.add_argument("--minimized", action="store_true", help="start in the tray without opening the chat "
                                                                 "window (used by start on login)")
    parser.add_argument("--no-tray", action="store_true", help="no tray icon: the chat window is the app")
    return parser


def app_icon():
    from PySide6.QtGui import QIcon

    icon = QIcon()
    for name in ("icon.svg", "icon.png", "specd.ico"):
        if (ICON_DIR / name).is_file():
            icon.addFile(str(ICON_DIR / name))
    return icon


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.screenshot:
        return take_screenshot(Path(args.screenshot), args.sample)
    return run_app(args)


def take_screenshot(path: Path, sample: str = "answered") -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    from specd.desktop.ui.screenshot import render_screenshot

    QApplication.instance() or QApplication(["specd-desktop"])
    render_screenshot(path, app_icon(), size=(1060, 680) if sample == "reconnecting" else (1000, 680),
                      sample=sample)
    print(f"wrote {path}")
    return 0


def run_app(args: argparse.Namespace) -> int:
    import qasync
    from PySide6.QtWidgets import QApplication, QMessageBox

    from specd.desktop.ui.app_runtime import (
        SingleInstance,
        install_exception_hooks,
        setup_logging,
        show_error_dialog,
    )
    from specd.desktop.ui.controller import DesktopApp
    from specd.desktop.ui.qt_garbage import QtThreadCollector
    from specd.desktop.ui.qt_platform import platform_problem
    from specd.shared.config import default_config_path
    from specd.shared.errors import ConfigError

    log_file = setup_logging()
    problem = platform_problem()
    if problem is not None and QApplication.instance() is None:  # Qt would abort without a word
        log.error("%s", problem)
        return 1
    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "specd-desktop"])
    app.setApplicationName("specd")
    app.setApplicationVersion(__version__)
    app.setWindowIcon(app_icon())
    instance = SingleInstance()
    if not instance.claim():
        print("specd-desktop is already running; its window was brought forward.")
        return 0
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    install_exception_hooks(show_error_dialog, loop)
    log.info("specd-desktop %s starting; log file %s", __version__, log_file)
    config_path = Path(args.config) if args.config else default_config_path()
    try:
        desktop = DesktopApp(config_path=config_path, use_tray=not args.no_tray, icon=app_icon())
    except ConfigError as exc:
        log.error("%s", exc)
        QMessageBox.critical(None, "specd: configuration error", str(exc))
        return 1
    # The app quits itself after a clean shutdown (Quit, or closing the window when there is no tray).
    app.setQuitOnLastWindowClosed(False)
    instance.activated.connect(desktop.window.bring_forward)
    if desktop.tray is None or not args.minimized:
        desktop.window.show()
    quitting = asyncio.Event()
    app.aboutToQuit.connect(quitting.set)
    heartbeat = quit_on_signals(desktop)
    with QtThreadCollector(), loop:  # the loop closes first, then its cycles are collected on this thread
        desktop.spawn(desktop.start())
        loop.run_until_complete(quitting.wait())
        if not desktop.closed.is_set():  # Qt quit by itself (log out): still close the client cleanly
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.wait_for(desktop.shutdown(), 10))
    heartbeat.stop()
    instance.release()
    log.info("specd-desktop stopped")
    return 0


def quit_on_signals(desktop):
    """SIGTERM (log out, ``kill``) and Ctrl+C quit cleanly, like the Quit menu entry. Python runs signal
    handlers only between bytecodes, so a timer wakes the interpreter while Qt waits for events."""
    import signal

    from PySide6.QtCore import QTimer

    def on_signal(signum, _frame):
        log.info("signal %s: quitting", signum)
        desktop.spawn(desktop.shutdown())

    for name in ("SIGTERM", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)
    heartbeat = QTimer()
    heartbeat.timeout.connect(lambda: None)
    heartbeat.start(300)
    return heartbeat


if __name__ == "__main__":
    sys.exit(main())
