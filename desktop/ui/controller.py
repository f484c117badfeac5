"""The tray app's brain: settings, device choice, the edge client, and what the window and tray show.

Everything slow runs off the Qt thread — device probing and model preparation in worker threads
(``asyncio.to_thread``), the network on the qasync event loop — so the window stays responsive.
The window and the tray menu only emit signals; this object turns them into tasks.

This module holds the app's state, wiring, status and quitting; its other concerns are mixed in:
:mod:`~specd.desktop.ui.edge_client_lifecycle` (build, connect, settle and close the edge client),
:mod:`~specd.desktop.ui.chat_answers` (ask and answer in the open conversation) and
:mod:`~specd.desktop.ui.settings_changes` (the device, the Settings dialog, remembered preferences).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Qt, QUrl
from PySide6.QtGui import QDesktopServices, QIcon
from PySide6.QtWidgets import QApplication, QSystemTrayIcon

from specd.desktop.drafters.devices import DeviceRow, probe_devices
from specd.desktop.ui.app_runtime import LOG_FILE
from specd.desktop.ui.chat_answers import ChatAnswers
from specd.desktop.ui.chat_session import ChatSession, open_store
from specd.desktop.ui.chat_window import ChatWindow
from specd.desktop.ui.edge_client_lifecycle import EdgeClientLifecycle
from specd.desktop.ui.idle_reconnect import IdleReconnector
from specd.desktop.ui.local_api import LocalApiRunner
from specd.desktop.ui.log_viewer import LogDialog
from specd.desktop.ui.progress import ProgressBoard
from specd.desktop.ui.settings_changes import SettingsChanges
from specd.desktop.ui.status_line import AppStatus
from specd.desktop.ui.tray_menu import TrayMenu
from specd.desktop.ui.user_settings import SecretStore, effective_config, read_settings, settings_path
from specd.shared.config import Config, to_dict
from specd.shared.errors import ConfigError
from specd.shared.paths import log_dir

log = logging.getLogger("specd.desktop")

Probe = Callable[[Config], list[DeviceRow]]
OpenUrl = Callable[[QUrl], bool]


class DesktopApp(EdgeClientLifecycle, ChatAnswers, SettingsChanges, QObject):
    """One running app: call :meth:`start` on the qasync loop, :meth:`shutdown` to quit cleanly."""

    def __init__(self, *, config_path: Path | None, settings_folder: Path | None = None,
                 secrets: SecretStore | None = None, use_tray: bool = True, probe: Probe | None = None,
                 build: Callable[..., Any] | None = None, icon: QIcon | None = None,
                 autostart_home: Path | None = None, on_quit: Callable[[], None] | None = None,
                 open_url: OpenUrl | None = None, log_folder: Path | None = None,
                 data_folder: Path | None = None) -> None:
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
        self.notifications: list[tuple[str, str]] = []
        self.state = "offline"
        self.reason = ""  # why the verifier is not connected, for the status tooltip and tray menu
        self.prepare_error = ""  # why there is no client at all
        self.latency = ""
        self.reconnector = IdleReconnector(self._on_retry)
        self.local_api = LocalApiRunner(on_change=self._show_status)
        self._lost = False  # the connection dropped since it was last up: say so when it comes back
        self._answer_task: asyncio.Task | None = None
        self._prepare_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.closed = asyncio.Event()

        self.icon = icon or QIcon()
        self.window = ChatWindow(self.icon)
        self.window.set_highlight(self.settings.desktop.highlight_tokens)
        # show_progress looked up at each call, so a test (or a later window) can wrap it.
        self.progress = ProgressBoard(lambda message: self.window.show_progress(message))
        self.menu = TrayMenu()
        self.tray: QSystemTrayIcon | None = None
        if use_tray and QSystemTrayIcon.isSystemTrayAvailable():
            self.tray = QSystemTrayIcon(self.icon, self)
            self.tray.setContextMenu(self.menu)
            self.tray.activated.connect(self._tray_activated)
            self.tray.show()
        self.window.hide_on_close = self.tray is not None  # no tray: the window is the app
        prefs = self.settings.desktop
        self.window.restore_geometry(prefs.window_width, prefs.window_height, prefs.sidebar_width)
        self.store, store_error = open_store(data_folder)
        if store_error:
            self.notify("Conversations are not saved", store_error)
        self.chat = ChatSession(self.store, self.window, system_prompt=lambda: self.config.chat.system_prompt,
                                sampling=lambda: to_dict(self.config)["sampling"], on_error=self._error,
                                stop_answer=self.stop)
        self.chat.new_chat()
        self.chat.refresh_list()
        self._wire()
        self._show_status()

    def _wire(self) -> None:
        w, menu = self.window, self.menu
        w.send_requested.connect(lambda text: self.spawn(self.send(text)))
        w.regenerate_requested.connect(lambda: self.spawn(self.regenerate()))
        w.edit_sent.connect(lambda index, text: self.spawn(self.send(text, edit_of=index)))
        w.stop_requested.connect(self.stop)
        w.closing.connect(self._remember_geometry)
        w.new_chat_requested.connect(self.new_chat)
        w.settings_requested.connect(self.open_settings)
        w.close_requested.connect(self._window_closed)
        w.highlight_box.toggled.connect(self._remember_highlight)
        menu.open_chat.connect(w.bring_forward)
        menu.device_picked.connect(lambda device: self.spawn(self.pick_device(device)))
        menu.settings.connect(self.open_settings)
        menu.view_logs.connect(self.view_logs)
        menu.quit.connect(lambda: self.spawn(self.shutdown()))
        menu.copy_api_url.connect(lambda: QApplication.clipboard().setText(self.local_api.url))

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

    # -- start-up and logs ------------------------------------------------------------------------
    async def start(self) -> None:
        with self.progress.begin("Looking for devices…"):
            self.rows = await asyncio.to_thread(self._probe, self.config)
        self.menu.set_devices(self.rows, self.requested_device)
        await self.prepare_client()
        await self.sync_local_api()

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
    def app_status(self) -> AppStatus:
        choice = self.setup.choice if self.setup is not None else None
        return AppStatus(
            state=self.state, endpoint=self.client.endpoint.display if self.client is not None else "",
            url=self.client.endpoint.url if self.client is not None else "",
            device=f"{choice.row.name} ({choice.row.backend})" if choice is not None else "",
            cloud_only_reason=(self.setup.drafter_error or "") if self.setup is not None else "",
            reason=self.reason, retry=self.reconnector.state, not_ready=self.prepare_error, latency=self.latency,
            api_in_flight=self.local_api.in_flight if self.local_api.api is not None else None)

    def status_text(self) -> str:
        return self.app_status().line()

    def _show_status(self) -> None:
        status = self.app_status()
        line, detail = status.line(), status.detail()
        self.menu.set_status(line, detail)
        self.menu.set_local_api(self.local_api.url, self.local_api.error)
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
        await self.local_api.stop()
        await self._close_client()
        self._remember_geometry()
        self.store.close()
        if self.tray is not None:
            self.tray.hide()
        self.window.hide_on_close = False
        self.window.hide()
        if self._on_quit is not None:
            self._on_quit()
        elif QApplication.instance() is not None:
            QApplication.instance().quit()


__all__ = ["ConfigError", "DesktopApp"]
