"""What every run of the tray app needs around the window: one instance per user, a rotating log
file, and uncaught exceptions logged and shown instead of vanishing."""

from __future__ import annotations

import asyncio
import getpass
import logging
import logging.handlers
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal
from PySide6.QtNetwork import QLocalServer, QLocalSocket
from PySide6.QtWidgets import QApplication, QMessageBox

from specd.shared.paths import log_dir

log = logging.getLogger("specd.desktop")
LOG_FILE = "specd-desktop.log"
LOG_BYTES, LOG_BACKUPS = 1_000_000, 5


def setup_logging(folder: Path | None = None, level: int = logging.INFO) -> Path:
    """Log to ``<log folder>/specd-desktop.log`` (rotated at 1 MB, 5 kept) and to stderr."""
    folder = folder or log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_FILE
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS,
                                                   encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(level)
    root.addHandler(handler)
    if sys.stderr is not None:  # a windowed exe has no stderr
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("specd-desktop: %(message)s"))
        console.setLevel(logging.WARNING)
        root.addHandler(console)
    for noisy in ("websockets", "urllib3", "filelock", "huggingface_hub", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path


ShowError = Callable[[str, str, str], None]  # (title, text, details)


def show_error_dialog(title: str, text: str, details: str = "") -> None:
    """A modal error box (used by the exception hooks); silently skipped without a QApplication."""
    if QApplication.instance() is None:
        return
    box = QMessageBox(QMessageBox.Icon.Critical, title, text)
    if details:
        box.setDetailedText(details)
    box.open()


def install_exception_hooks(show: ShowError, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Route uncaught exceptions — Qt slots, plain code, asyncio tasks — to the log and a dialog."""

    def excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        details = "".join(traceback.format_exception(kind, exc, tb))
        log.error("uncaught exception:\n%s", details)
        show("specd: unexpected error", f"{kind.__name__}: {exc}", details)

    sys.excepthook = excepthook
    if loop is not None:
        def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            message = context.get("message", "")
            if isinstance(exc, asyncio.CancelledError):
                return
            if exc is None:
                log.error("asyncio: %s", message)
                return
            details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            log.error("%s:\n%s", message, details)
            show("specd: unexpected error", f"{type(exc).__name__}: {exc}", details)

        loop.set_exception_handler(handler)


class SingleInstance(QObject):
    """One app per user: the first run listens on a local socket; a later run tells it to come
    forward and exits. ``activated`` fires in the first run when that happens."""

    activated = Signal()

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self.name = name or f"specd-desktop-{_user()}"
        self.server: QLocalServer | None = None

    def claim(self) -> bool:
        """True: this is the first instance (now listening). False: another one was told to show."""
        socket = QLocalSocket()
        socket.connectToServer(self.name)
        if socket.waitForConnected(500):
            socket.write(b"show\n")
            socket.flush()
            socket.waitForBytesWritten(500)
            socket.disconnectFromServer()
            return False
        server = QLocalServer(self)
        server.setSocketOptions(QLocalServer.SocketOption.UserAccessOption)
        if not server.listen(self.name):
            QLocalServer.removeServer(self.name)  # a stale socket file left by a crash
            if not server.listen(self.name):
                log.warning("single instance: cannot listen on %s: %s", self.name, server.errorString())
                return True
        server.newConnection.connect(self._on_connection)
        self.server = server
        return True

    def _on_connection(self) -> None:
        # Read synchronously: the second launch writes at once and exits, and keeping no signal
        # connections on the sockets avoids callbacks into half-destroyed objects at shutdown.
        while self.server is not None and self.server.hasPendingConnections():
            client = self.server.nextPendingConnection()
            if client.bytesAvailable() or client.waitForReadyRead(500):
                message = bytes(client.readAll().data())
            else:
                message = b""
            client.abort()
            client.deleteLater()
            if b"show" in message:
                self.activated.emit()

    def release(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def _user() -> str:
    try:
        return "".join(c for c in getpass.getuser() if c.isalnum()) or "user"
    except Exception:  # no user name in the environment (some containers)
        return "user"
