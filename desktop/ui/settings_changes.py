"""The tray app's settings changes: a device picked in the tray menu, the Settings dialog applied, the
window's remembered preferences; each rebuilds the edge client and restarts the local API only when what
they are built from changed.

Mixed into :class:`~specd.desktop.ui.controller.DesktopApp`, which owns the state annotated below.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec

from specd.desktop.drafters.devices import DeviceRow
from specd.desktop.ui.chat_window import ChatWindow
from specd.desktop.ui.local_api import LocalApiRunner
from specd.desktop.ui.settings_dialog import SettingsDialog
from specd.desktop.ui.tray_menu import TrayMenu
from specd.desktop.ui.user_settings import (
    SecretStore,
    UserSettings,
    effective_config,
    set_start_on_login,
    write_settings,
)
from specd.shared.config import ChatConfig, Config, load_config

log = logging.getLogger("specd.desktop")


class SettingsChanges:
    """Apply what the user changed: the device, the settings, the window's size and highlight."""

    # The app's state this part reads and writes (set in DesktopApp.__init__).
    config_path: Path | None
    config: Config
    settings: UserSettings
    settings_file: Path
    secrets: SecretStore
    autostart_home: Path | None
    rows: list[DeviceRow]
    local_api: LocalApiRunner
    menu: TrayMenu
    window: ChatWindow
    # The app's tasks and reports (DesktopApp) and the client's rebuild (EdgeClientLifecycle).
    spawn: Callable[[Any], Any]
    _error: Callable[[str], None]
    _show_status: Callable[[], None]
    prepare_client: Callable[..., Coroutine[Any, Any, None]]

    @property
    def requested_device(self) -> str:
        return self.settings.desktop.device or self.config.devices.edge_device

    async def pick_device(self, device: str) -> None:
        """Use ``device`` (a row id or "auto") from now on, remembered across restarts."""
        self.settings = self.settings.with_desktop(device=device)
        write_settings(self.settings_file, self.settings)
        self.menu.set_active_device(device)
        await self.prepare_client(announce=True)
        await self.sync_local_api()

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
        old = (client_part(self.config), self.settings.desktop.device, self.secrets.load())
        api_was = self.settings.desktop.local_api
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
        if (client_part(self.config), settings.desktop.device, self.secrets.load()) != old:
            await self.prepare_client()
            await self.sync_local_api()
        elif settings.desktop.local_api != api_was:
            await self.sync_local_api()

    async def sync_local_api(self) -> None:
        """Run the local API when Settings has it on, with the current config and device."""
        await self.local_api.apply(self.settings.desktop.local_api, self.config,
                                   device=self.settings.desktop.device or None, verifier_key=self.secrets.load())
        self._show_status()

    def _remember_highlight(self, on: bool) -> None:
        self._remember(highlight_tokens=on)

    def _remember_geometry(self) -> None:
        width, height, sidebar = self.window.geometry_to_remember()
        self._remember(window_width=width, window_height=height, sidebar_width=sidebar)

    def _remember(self, **prefs: Any) -> None:
        if any(getattr(self.settings.desktop, name) != value for name, value in prefs.items()):
            self.settings = self.settings.with_desktop(**prefs)
            with contextlib.suppress(OSError):
                write_settings(self.settings_file, self.settings)


def client_part(config: Config) -> Config:
    """What the client is built from: all but ``[chat]`` (a new system prompt needs no new client)."""
    return msgspec.structs.replace(config, chat=ChatConfig())
