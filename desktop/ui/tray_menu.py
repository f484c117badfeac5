"""The tray menu: Open chat · Device ▸ · status line · Local API (URL, Copy) · Settings… · View logs · Quit.

The menu is a plain ``QMenu`` built from device-probe rows, so it exists (and is tested) even where
the platform has no system tray; :class:`~specd.desktop.ui.controller.DesktopApp` attaches it to a
``QSystemTrayIcon`` when there is one.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtGui import QAction, QActionGroup
from PySide6.QtWidgets import QMenu, QWidget

from specd.desktop.drafters.devices import DeviceRow, format_memory

AUTO = "auto"


RUNNING = "★ "
STATUS_CHARS = 140  # a menu entry is as wide as its text: longer reasons are cut here, whole in the tooltip


def device_label(row: DeviceRow, *, running: bool = False) -> str:
    """``★ NVIDIA RTX 4060 — torch, 8.0 GiB (best)``: ★ marks the device the draft model runs on,
    (best) the one Automatic prefers; unavailable rows say why."""
    memory = format_memory(row.memory_bytes)
    text = f"{row.name} — {row.backend}" + (f", {memory}" if memory else "")
    if running:
        text = RUNNING + text
    if row.best:
        text += " (best)"
    if not row.available:
        text += f" — unavailable: {row.reason}"
    return text


class TrayMenu(QMenu):
    open_chat = Signal()
    device_picked = Signal(str)  # a row id, or "auto"
    settings = Signal()
    view_logs = Signal()
    quit = Signal()
    copy_api_url = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.addAction("Open chat", self.open_chat.emit)
        self.devices = self.addMenu("Device")
        self.device_group = QActionGroup(self)
        self.device_group.setExclusive(True)
        self.device_actions: dict[str, QAction] = {}
        self.rows: dict[str, DeviceRow] = {}
        self.running: str | None = None
        self.addSeparator()
        self.status_action = self.addAction("Starting…")
        self.status_action.setEnabled(False)
        self.api_action = self.addAction("Local API: off (Settings…)")
        self.api_action.setEnabled(False)
        self.copy_api_action = self.addAction("Copy Local API URL", self.copy_api_url.emit)
        self.copy_api_action.setVisible(False)
        self.addSeparator()
        self.addAction("Settings…", self.settings.emit)
        self.addAction("View logs", self.view_logs.emit)
        self.addSeparator()
        self.addAction("Quit", self.quit.emit)
        self.setToolTipsVisible(True)
        self.set_devices([], AUTO)

    def set_devices(self, rows: list[DeviceRow], active: str) -> None:
        """Rebuild the Device submenu: an Automatic entry, then one radio entry per probed row."""
        self.devices.clear()
        for action in self.device_group.actions():
            self.device_group.removeAction(action)
        self.device_actions = {}
        self.rows = {row.id: row for row in rows}
        entries = [(AUTO, "Automatic (best available)", True, "")]
        entries += [(row.id, device_label(row), row.available, row.reason) for row in rows]
        for row_id, text, enabled, reason in entries:
            action = QAction(text, self.devices)
            action.setCheckable(True)
            action.setEnabled(enabled)
            action.setData(row_id)
            if reason:
                action.setToolTip(reason)
            action.triggered.connect(lambda _checked=False, rid=row_id: self.device_picked.emit(rid))
            self.device_group.addAction(action)
            self.devices.addAction(action)
            self.device_actions[row_id] = action
            if row_id == AUTO and rows:
                self.devices.addSeparator()
        self.set_active_device(active)
        self.set_running_device(self.running)
        self.devices.setToolTipsVisible(True)

    def set_running_device(self, row_id: str | None) -> None:
        """Star the row the draft model runs on (None: no draft model); the tick stays on the choice."""
        self.running = row_id
        for rid, row in self.rows.items():
            self.device_actions[rid].setText(device_label(row, running=rid == row_id))

    def set_active_device(self, active: str) -> None:
        """Tick what the user picked: a row, or Automatic (also for a kind such as "cpu")."""
        action = self.device_actions.get(active) or self.device_actions.get(AUTO)
        if action is not None:
            action.setChecked(True)

    def active_device(self) -> str | None:
        action = self.device_group.checkedAction()
        return action.data() if action is not None else None

    def set_local_api(self, url: str, error: str = "") -> None:
        """The local API's URL with a Copy entry while it runs; off, or why it could not start."""
        if url:
            self.api_action.setText(f"Local API: {url}")
        elif error:
            self.api_action.setText(f"Local API not running: {error[:STATUS_CHARS]}".replace("&", "&&"))
        else:
            self.api_action.setText("Local API: off (Settings…)")
        self.api_action.setToolTip(error or url)
        self.copy_api_action.setVisible(bool(url))

    def set_status(self, text: str, detail: str = "") -> None:
        """The status line, with why it is offline; the whole text is in its tooltip."""
        line = " ".join(text.split())
        if len(line) > STATUS_CHARS:
            line = line[:STATUS_CHARS - 1].rstrip() + "…"
        self.status_action.setText(line.replace("&", "&&"))
        self.status_action.setToolTip(detail or text)
