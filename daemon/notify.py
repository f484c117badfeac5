"""Living under systemd: ``sd_notify`` messages, the watchdog, and where log lines go.

Everything here is a no-op outside systemd. systemd-python is used when it is installed; otherwise a
tiny datagram client talks to ``$NOTIFY_SOCKET`` itself (path or abstract ``@`` socket), so the
behaviour is the same in a PyInstaller bundle without libsystemd and testable with a socket a test owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from typing import ClassVar

log = logging.getLogger("specd.daemon")

# While the model loads, ask systemd for this much more start-up time, re-sent every third of it.
EXTEND_TIMEOUT_S = 60.0


class Notifier:
    """Sends ``sd_notify`` state lines; silently does nothing when not started by systemd."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.socket_path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None
        self._systemd = None
        if self.socket_path and socket_path is None:
            try:
                from systemd import daemon as systemd_daemon  # type: ignore[import-not-found]

                self._systemd = systemd_daemon
            except ImportError:
                pass

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``READY=1``, ``STATUS=…``) as one datagram; True if it was sent."""
        if not self.socket_path:
            return False
        message = "\n".join(lines)
        try:
            if self._systemd is not None:
                return bool(self._systemd.notify(message))
            return self._send(message.encode("utf-8"))
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)
            return False

    def _send(self, data: bytes) -> bool:
        address = self.socket_path
        if address.startswith("@"):
            address = "\0" + address[1:]  # Linux abstract namespace
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.sendto(data, address)
        return True

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, or None when systemd's watchdog is not on for us."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2 / 1_000_000


async def run_watchdog(notifier: Notifier, interval: float) -> None:
    """Ping the watchdog from the event loop: a stuck loop stops the pings and systemd restarts us."""
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def extend_start_timeout(notifier: Notifier, period: float = EXTEND_TIMEOUT_S) -> None:
    """Keep pushing systemd's start timeout out while a (possibly large) model loads or downloads."""
    while True:
        notifier.notify(f"EXTEND_TIMEOUT_USEC={int(period * 1_000_000)}")
        await asyncio.sleep(period / 3)


class _SyslogPrefixFormatter(logging.Formatter):
    """``<N>message``: journald reads the priority prefix from a service's stderr."""

    _PRIORITY: ClassVar[dict[int, int]] = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                                           logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level: str = "info") -> None:
    """journald (structured, via systemd-python) under systemd; readable stderr lines otherwise."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler  # type: ignore[import-not-found]

            handler = JournalHandler(SYSLOG_IDENTIFIER="specd-verifier")
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_SyslogPrefixFormatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                               datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Library chatter stays at warning unless debugging.
    for noisy in ("websockets", "transformers", "torch", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


async def cancel_quietly(task: asyncio.Task | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
