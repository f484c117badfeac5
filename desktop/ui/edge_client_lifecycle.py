"""The tray app's edge client: built for the current config and device, connected, its draft precision
settled on a first connection, closed again; and the connection state that the status line and the
background reconnects follow.

Mixed into :class:`~specd.desktop.ui.controller.DesktopApp`, which owns the state annotated below; the
worker thread builds the client, the qasync loop connects it, so the window stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from specd.desktop.client.connection import ConnectionFailed
from specd.desktop.ui.chat_window import ChatWindow
from specd.desktop.ui.idle_reconnect import IdleReconnector, RetryState
from specd.desktop.ui.progress import ProgressBoard
from specd.desktop.ui.status_line import milliseconds
from specd.desktop.ui.tray_menu import TrayMenu
from specd.desktop.ui.user_settings import SecretStore, UserSettings
from specd.shared.config import Config
from specd.shared.errors import SpecdError

log = logging.getLogger("specd.desktop")


class EdgeClientLifecycle:
    """Build, connect, settle and close the app's edge client; follow its connection state."""

    # The app's state this part reads and writes (set in DesktopApp.__init__).
    config: Config
    settings: UserSettings
    secrets: SecretStore
    setup: Any  # launch.ClientSetup once the client is ready
    client: Any
    state: str
    reason: str
    prepare_error: str
    latency: str
    reconnector: IdleReconnector
    progress: ProgressBoard
    menu: TrayMenu
    window: ChatWindow
    closed: asyncio.Event
    _build: Callable[..., Any] | None
    _lost: bool
    _answer_task: asyncio.Task | None
    _prepare_task: asyncio.Task | None
    # The app's own reports (DesktopApp).
    notify: Callable[[str, str], None]
    _error: Callable[[str], None]
    _show_status: Callable[[], None]

    async def prepare_client(self, *, announce: bool = False) -> None:
        """(Re)build the client for the current config and device; the old one is closed first, quietly
        (a reconnect the app makes itself is no outage). ``announce``: say which device is now used."""
        if self._prepare_task is not None and not self._prepare_task.done():
            self._prepare_task.cancel()
        self._prepare_task = asyncio.current_task()
        await self._close_client()
        span = self.progress.begin("Preparing the draft model…")
        try:
            setup = await asyncio.to_thread(self._build_client, span.post)
        except SpecdError as exc:
            self.prepare_error = f"cannot prepare the client: {exc}"
            span.end()
            self._show_status()
            self._error(f"Cannot prepare the client: {exc}")
            return
        finally:
            span.end()  # steps the worker posted but the loop has not shown yet are dropped from here on
        self.prepare_error = ""
        self.state, self.reason, self.latency = "offline", "", ""
        self.setup, self.client = setup, setup.client
        key = self.secrets.load()
        if key:
            setup.client.endpoint = dataclasses.replace(setup.client.endpoint, api_key=key)
        setup.client.on_status = self._on_status
        choice = setup.choice
        self.menu.set_running_device(choice.row.id if choice is not None else None)
        if choice is not None:
            if choice.fell_back:
                self.notify("Device fell back", choice.summary())
            elif announce:
                self.notify("Device", f"Switched to {choice.row.name} ({choice.row.backend})")
        elif setup.drafter_error:
            self.notify("No draft model", f"Answers are cloud-only: {setup.drafter_error}")
        self._show_status()
        await self.connect_client()
        if self.client is setup.client and setup.client.connected and choice is not None:
            # draft_precision "auto": on a first connection, build and measure the candidates (with progress).
            from specd.desktop.precision.measure import settle_precision

            with self.progress.begin() as span:
                await settle_precision(setup, self.config, span.post)

    def _build_client(self, progress: Callable[[str], None]) -> Any:
        build = self._build
        if build is None:
            from specd.desktop.commands.launch import build_client as build
        device = self.settings.desktop.device or None
        return build(self.config, device=device, progress=progress)

    # Not `connect`: PySide finds QObject.connect first on an instance whose class mixes this in.
    async def connect_client(self) -> None:
        if self.client is None:
            return
        started = asyncio.get_running_loop().time()
        try:
            await self.client.connect()
            self.latency = "handshake " + milliseconds(1000 * (asyncio.get_running_loop().time() - started))
        except ConnectionFailed as exc:
            log.warning("cannot connect: %s", exc)
            self._on_status("offline", str(exc), retry=exc.retry)
        except SpecdError as exc:
            log.warning("cannot connect: %s", exc)
            self._on_status("offline", str(exc), retry=False)
        self._show_status()

    async def _close_client(self) -> None:
        client, self.client, self.setup = self.client, None, None
        self.reconnector.stop()
        if client is not None:
            client.on_status = None  # closing it on purpose: not a lost connection
            client.cancel()
            with contextlib.suppress(Exception):
                await client.close()
            drafter = getattr(client, "drafter", None)
            if drafter is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(drafter.close)

    # -- connection state -------------------------------------------------------------------------
    def _on_status(self, state: str, message: str, *, retry: bool = True) -> None:
        """The edge client's state changed (``message`` says why); ``retry``: whether reconnecting may help."""
        previous, self.state = self.state, state
        if state == "connected":
            self.reason = ""
        else:
            self.reason, self.latency = message, ""
        if previous == "connected" and state != "connected":
            self._lost = True
            self.notify("Connection lost", message)
        elif state == "connected" and self._lost:
            self._lost = False
            self.notify("Connected again", message)
        if retry:
            self._retry_while_idle()
        self._show_status()

    def _retry_while_idle(self) -> None:
        """Between answers nobody else reconnects: keep trying in the background."""
        answering = self._answer_task is not None and not self._answer_task.done()
        # The client's state, not `client.connected`: a reader reporting the loss is still running.
        if self.client is None or answering or self.closed.is_set() or self.state == "connected":
            return
        self.reconnector.start(self.client, self.reason or "the verifier is not connected")

    def _on_retry(self, retry: RetryState | None) -> None:
        if retry is not None:
            self.reason = retry.reason
        self._show_status()
