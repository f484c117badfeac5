"""The tray app's brain: settings, device choice, the edge client, and what the window and tray show.

Everything slow runs off the Qt thread — device probing and model preparation in worker threads
(``asyncio.to_thread``), the network on the qasync event loop — so the window stays responsive.
The window and the tray menu only emit signals; this object turns them into tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Qt, QUrl
from PySide6.QtGui import QDesktopServices, QIcon
from PySide6.QtWidgets import QApplication, QSystemTrayIcon

from specd.desktop.client.connection import ConnectionFailed
from specd.desktop.client.stats_line import stats_line
from specd.desktop.drafters.devices import DeviceRow, probe_devices
from specd.desktop.ui.app_runtime import LOG_FILE
from specd.desktop.ui.chat_window import ChatWindow
from specd.desktop.ui.idle_reconnect import IdleReconnector, RetryState
from specd.desktop.ui.log_viewer import LogDialog
from specd.desktop.ui.settings_dialog import SettingsDialog
from specd.desktop.ui.status_line import AppStatus, milliseconds
from specd.desktop.ui.tray_menu import TrayMenu
from specd.desktop.ui.user_settings import (
    SecretStore,
    UserSettings,
    effective_config,
    read_settings,
    set_start_on_login,
    settings_path,
    write_settings,
)
from specd.shared.config import Config, load_config
from specd.shared.errors import ConfigError, SpecdError
from specd.shared.paths import log_dir

log = logging.getLogger("specd.desktop")

Probe = Callable[[Config], list[DeviceRow]]
OpenUrl = Callable[[QUrl], bool]


class DesktopApp(QObject):
    """One running app: call :meth:`start` on the qasync loop, :meth:`shutdown` to quit cleanly."""

    def __init__(self, *, config_path: Path | None, settings_folder: Path | None = None,
                 secrets: SecretStore | None = None, use_tray: bool = True, probe: Probe | None = None,
                 build: Callable[..., Any] | None = None, icon: QIcon | None = None,
                 autostart_home: Path | None = None, on_quit: Callable[[], None] | None = None,
                 open_url: OpenUrl | None = None, log_folder: Path | None = None) -> None:
        super().__init__()
        self._on_quit = on_quit
        self._open_url = open_url or QDesktopServices.openUrl
        self.log_folder = log_folder or log_dir()
        self.config_path = config_path
        self.settings_file = settings_path(settings_folder)
        self.secrets = secrets or SecretStore(settings_folder)
        self.autostart_home = autostart_home
        self._probe = probe or (lambda cfg: probe_devices(cfg))
        self._build = build
        self.settings = read_settings(self.settings_file)
        self.config = effective_config(config_path, self.settings, layer_source=str(self.settings_file))
        self.rows: list[DeviceRow] = []
        self.setup: Any = None  # launch.ClientSetup once the client is ready
        self.client: Any = None
        self.conversation: list[dict[str, str]] = []
        self.notifications: list[tuple[str, str]] = []
        self.state = "offline"
        self.reason = ""  # why the verifier is not connected, for the status tooltip and tray menu
        self.prepare_error = ""  # why there is no client at all
        self.latency = ""
        self.reconnector = IdleReconnector(self._on_retry)
        self._lost = False  # the connection dropped since it was last up: say so when it comes back
        self._answer_task: asyncio.Task | None = None
        self._prepare_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.closed = asyncio.Event()

        self.icon = icon or QIcon()
        self.window = ChatWindow(self.icon)
        self.window.set_highlight(self.settings.desktop.highlight_tokens)
        self.menu = TrayMenu()
        self.tray: QSystemTrayIcon | None = None
        if use_tray and QSystemTrayIcon.isSystemTrayAvailable():
            self.tray = QSystemTrayIcon(self.icon, self)
            self.tray.setContextMenu(self.menu)
            self.tray.activated.connect(self._tray_activated)
            self.tray.show()
        self.window.hide_on_close = self.tray is not None  # no tray: the window is the app
        self._wire()
        self._show_status()

    def _wire(self) -> None:
        w, menu = self.window, self.menu
        w.send_requested.connect(lambda text: self.spawn(self.send(text)))
        w.stop_requested.connect(self.stop)
        w.new_chat_requested.connect(self.new_chat)
        w.settings_requested.connect(self.open_settings)
        w.close_requested.connect(self._window_closed)
        w.highlight_box.toggled.connect(self._remember_highlight)
        menu.open_chat.connect(w.bring_forward)
        menu.device_picked.connect(lambda device: self.spawn(self.pick_device(device)))
        menu.settings.connect(self.open_settings)
        menu.view_logs.connect(self.view_logs)
        menu.quit.connect(lambda: self.spawn(self.shutdown()))

    def spawn(self, coro: Any) -> asyncio.Task:
        """Run ``coro`` on the loop, keeping a reference so it is not collected and can be cancelled."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            loop = asyncio.get_event_loop()
            loop.call_exception_handler({"message": "a task of the tray app failed", "exception": exc})

    # -- start-up and the client ------------------------------------------------------------------
    @property
    def requested_device(self) -> str:
        return self.settings.desktop.device or self.config.devices.edge_device

    async def start(self) -> None:
        self.window.show_progress("Looking for devices…")
        self.rows = await asyncio.to_thread(self._probe, self.config)
        self.menu.set_devices(self.rows, self.requested_device)
        await self.prepare_client()

    async def prepare_client(self, *, announce: bool = False) -> None:
        """(Re)build the client for the current config and device; the old one is closed first, quietly
        (a reconnect the app makes itself is no outage). ``announce``: say which device is now used."""
        if self._prepare_task is not None and not self._prepare_task.done():
            self._prepare_task.cancel()
        self._prepare_task = asyncio.current_task()
        await self._close_client()
        loop = asyncio.get_running_loop()

        def progress(message: str) -> None:  # called from the worker thread
            log.info("%s", message)
            loop.call_soon_threadsafe(self.window.show_progress, message)

        self.window.show_progress("Preparing the draft model…")
        try:
            setup = await asyncio.to_thread(self._build_client, progress)
        except SpecdError as exc:
            self.prepare_error = f"cannot prepare the client: {exc}"
            self.window.show_progress(None)
            self._show_status()
            self._error(f"Cannot prepare the client: {exc}")
            return
        finally:
            self.window.show_progress(None)
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
        await self.connect()
        if self.client is setup.client and setup.client.connected and choice is not None:
            # draft_precision "auto": on a first connection, build and measure the candidates (with progress).
            from specd.desktop.precision.measure import settle_precision

            try:
                await settle_precision(setup, self.config, progress)
            finally:
                self.window.show_progress(None)

    def _build_client(self, progress: Callable[[str], None]) -> Any:
        build = self._build
        if build is None:
            from specd.desktop.commands.launch import build_client as build
        device = self.settings.desktop.device or None
        return build(self.config, device=device, progress=progress)

    async def connect(self) -> None:
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

    # -- answers ----------------------------------------------------------------------------------
    async def send(self, text: str) -> None:
        if self._answer_task is not None and not self._answer_task.done():
            return
        if self.client is None:
            if self.prepare_error:
                self._error(f"Cannot answer: {self.prepare_error}. Change it in Settings….")
            else:
                self._error("The client is not ready yet (the draft model is still being prepared).")
            return
        self._answer_task = asyncio.current_task()
        await self.reconnector.pause()  # the answer reconnects by itself; one handshake at a time
        self.conversation.append({"role": "user", "content": text})
        self.window.add_turn("user", text)
        self.window.add_turn("assistant", pending=True)
        self.window.set_busy(True)
        try:
            answer = await self.client.chat(list(self.conversation), self.setup.settings,
                                            lambda piece: self.window.append_piece(piece.text, piece.source))
        except SpecdError as exc:
            self.conversation.pop()
            self.window.finish_turn("")
            self.window.add_turn("error", str(exc))
            self._show_status()
            return
        finally:
            self.window.set_busy(False)
            self._answer_task = None
            self._retry_while_idle()
        self.conversation.append({"role": "assistant", "content": answer.text})
        stats = answer.stats.to_json()
        self.window.finish_turn(stats_line(stats, answer.finish_reason))
        if answer.stats.rounds and answer.stats.network_ms:
            self.latency = "round trip " + milliseconds(answer.stats.network_ms / answer.stats.rounds)
        self._show_status()

    def stop(self) -> None:
        if self.client is not None:
            self.client.cancel()

    def new_chat(self) -> None:
        self.stop()
        self.conversation.clear()
        self.window.clear_conversation()

    # -- device, settings, logs -------------------------------------------------------------------
    async def pick_device(self, device: str) -> None:
        """Use ``device`` (a row id or "auto") from now on, remembered across restarts."""
        self.settings = self.settings.with_desktop(device=device)
        write_settings(self.settings_file, self.settings)
        self.menu.set_active_device(device)
        await self.prepare_client(announce=True)

    def open_settings(self) -> SettingsDialog:
        base = load_config(self.config_path)
        dialog = SettingsDialog(base=base, settings=self.settings, api_key=self.secrets.load(),
                                key_store=self.secrets.where, rows=self.rows, config_path=self.config_path,
                                parent=self.window if self.window.isVisible() else None)
        dialog.accepted.connect(lambda: self.spawn(self.apply_settings(dialog.result_settings,
                                                                      dialog.result_api_key)))
        dialog.open()  # not exec(): a nested loop would stall the asyncio tasks
        return dialog

    async def apply_settings(self, settings: UserSettings | None, api_key: str | None) -> None:
        if settings is None:
            return
        old = (self.config, self.settings.desktop.device, self.secrets.load())
        self.config = effective_config(self.config_path, settings)
        if settings.desktop.start_on_login != self.settings.desktop.start_on_login:
            try:
                where = set_start_on_login(settings.desktop.start_on_login, home_config=self.autostart_home)
                log.info("start on login %s: %s", "on" if settings.desktop.start_on_login else "off", where)
            except OSError as exc:
                self._error(f"Cannot change start on login: {exc}")
        self.settings = settings
        write_settings(self.settings_file, settings)
        if api_key is not None:
            self.secrets.save(api_key)
        self.window.set_highlight(settings.desktop.highlight_tokens)
        self.menu.set_active_device(self.requested_device)
        if (self.config, settings.desktop.device, self.secrets.load()) != old:
            await self.prepare_client()

    def _remember_highlight(self, on: bool) -> None:
        if on != self.settings.desktop.highlight_tokens:
            self.settings = self.settings.with_desktop(highlight_tokens=on)
            with contextlib.suppress(OSError):
                write_settings(self.settings_file, self.settings)

    def view_logs(self) -> LogDialog | None:
        """Open the log folder in the file manager; where there is none, show the log in a dialog."""
        folder = self.log_folder
        folder.mkdir(parents=True, exist_ok=True)
        if self._open_url(QUrl.fromLocalFile(str(folder))):
            return None
        log.info("no file manager opened %s; showing the log in a dialog", folder)
        dialog = LogDialog(folder / LOG_FILE, parent=self.window if self.window.isVisible() else None)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.open()
        return dialog

    # -- status and notifications -----------------------------------------------------------------
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

    def app_status(self) -> AppStatus:
        choice = self.setup.choice if self.setup is not None else None
        return AppStatus(
            state=self.state, endpoint=self.client.endpoint.display if self.client is not None else "",
            url=self.client.endpoint.url if self.client is not None else "",
            device=f"{choice.row.name} ({choice.row.backend})" if choice is not None else "",
            cloud_only_reason=(self.setup.drafter_error or "") if self.setup is not None else "",
            reason=self.reason, retry=self.reconnector.state, not_ready=self.prepare_error, latency=self.latency)

    def status_text(self) -> str:
        return self.app_status().line()

    def _show_status(self) -> None:
        status = self.app_status()
        line, detail = status.line(), status.detail()
        self.menu.set_status(line, detail)
        self.window.set_status(line, status.shown_latency(), detail)
        if self.tray is not None:
            self.tray.setToolTip(f"specd — {line}")

    def notify(self, title: str, message: str) -> None:
        log.info("%s: %s", title, message)
        self.notifications.append((title, message))
        if self.tray is not None:
            self.tray.showMessage(title, message, QSystemTrayIcon.MessageIcon.Information, 8000)
        else:
            self.window.statusBar().showMessage(f"{title}: {message}", 8000)

    def _error(self, message: str) -> None:
        log.error("%s", message)
        self.window.add_turn("error", message)

    def _tray_activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason in (QSystemTrayIcon.ActivationReason.Trigger, QSystemTrayIcon.ActivationReason.DoubleClick):
            self.window.bring_forward()

    # -- quitting ---------------------------------------------------------------------------------
    def _window_closed(self) -> None:
        """Without a tray, closing the window quits (cleanly, when the event loop still runs)."""
        if self.closed.is_set():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # Qt is tearing down after the loop ended: nothing async can run now
            self.stop()
            return
        self.spawn(self.shutdown())

    async def shutdown(self) -> None:
        """Stop the answer, close the client and drafter, cancel pending tasks, then quit Qt."""
        if self.closed.is_set():
            return
        self.closed.set()
        log.info("quitting")
        self.stop()
        current = asyncio.current_task()
        pending = [t for t in self._tasks if t is not current and not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        await self._close_client()
        if self.tray is not None:
            self.tray.hide()
        self.window.hide_on_close = False
        self.window.hide()
        if self._on_quit is not None:
            self._on_quit()
        elif QApplication.instance() is not None:
            QApplication.instance().quit()


__all__ = ["ConfigError", "DesktopApp"]
