"""Reconnecting to the verifier while the app is idle.

The edge client reconnects by itself during an answer. Between answers nobody would, so the window
would stay offline until the next message. :class:`IdleReconnector` retries in the background with
backoff (1 s, 2 s, 4 s … up to ``[client] reconnect_max_s``), counting down once a second so the
status bar can say ``Reconnecting in N s…`` and why the last attempt failed. No Qt here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from specd.shared.errors import SpecdError

log = logging.getLogger("specd.desktop")
FIRST_DELAY_S = 1.0


class Connectable(Protocol):
    reconnect_max_s: float

    async def connect(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class RetryState:
    """What the reconnector is doing: waiting ``seconds`` more, ``trying`` now, or ``gave_up``
    (the verifier refused for a reason retrying cannot fix); ``reason`` is why it is offline."""

    phase: str  # waiting | trying | gave_up
    seconds: int
    reason: str

    @property
    def text(self) -> str:
        if self.phase == "waiting":
            return f"Reconnecting in {self.seconds} s…"
        return "Reconnecting…" if self.phase == "trying" else "Offline"


class IdleReconnector:
    """Retries ``client.connect()`` until it succeeds; :meth:`pause` before an answer takes over."""

    def __init__(self, on_change: Callable[[RetryState | None], None]) -> None:
        self.on_change = on_change  # a new RetryState each second; None once connected or stopped
        self.state: RetryState | None = None
        self._task: asyncio.Task | None = None
        self._attempt: asyncio.Future | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, client: Connectable, reason: str) -> None:
        """Begin retrying (no-op when already retrying)."""
        if not self.running:
            self._task = asyncio.ensure_future(self._retry(client, reason))

    async def pause(self) -> None:
        """Stop retrying; an attempt already under way is allowed to finish, so that two handshakes
        never run at once on one client."""
        task, attempt = self._task, self._attempt
        self._task = None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if attempt is not None and not attempt.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await attempt
        self._set(None)

    def stop(self) -> None:
        """Stop at once, abandoning an attempt in flight (the client is being closed anyway)."""
        for pending in (self._task, self._attempt):
            if pending is not None and not pending.done():
                pending.cancel()
        self._task = self._attempt = None
        self.state = None

    async def _retry(self, client: Connectable, reason: str) -> None:
        loop = asyncio.get_running_loop()
        delay = min(FIRST_DELAY_S, client.reconnect_max_s)
        while True:
            end = loop.time() + delay
            while (left := end - loop.time()) > 0:
                self._set(RetryState("waiting", max(1, math.ceil(left)), reason))
                await asyncio.sleep(left - (math.ceil(left) - 1))  # to the next whole second
            self._set(RetryState("trying", 0, reason))
            self._attempt = asyncio.ensure_future(client.connect())
            try:
                await asyncio.shield(self._attempt)
            except SpecdError as exc:  # ConnectionFailed says whether retrying may help; others cannot
                reason = str(exc)
                log.info("reconnect failed: %s", reason)
                if not getattr(exc, "retry", False):
                    self._set(RetryState("gave_up", 0, reason))
                    return
            else:
                self._set(None)
                return
            finally:
                self._attempt = None
            delay = min(client.reconnect_max_s, delay * 2)

    def _set(self, state: RetryState | None) -> None:
        if state != self.state:
            self.state = state
            self.on_change(state)
