"""Settings…: server, API key, TLS, draft model, device, sampling, γ, pipelining, system prompt, start on login.

The dialog edits a :class:`UserSettings` layer over ``config.toml``. On OK the merged result is
loaded with ``load_config``; a bad value keeps the dialog open with the reason (the same message the
CLI would print, naming the key). Only values that differ from ``config.toml`` go in the layer, so
later edits of ``config.toml`` still apply to everything the user did not change here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from specd.desktop.drafters.devices import KINDS, DeviceRow
from specd.desktop.ui.user_settings import UserSettings, effective_config
from specd.shared.config import Config, to_dict
from specd.shared.errors import ConfigError, ModelError
from specd.shared.models import resolve_source

# (section, key, label, kind) of the config fields the dialog edits as text.
TEXT_FIELDS = (
    ("client", "server_url", "Server URL", str),
    ("models", "draft", "Draft model or path", str),
    ("sampling", "temperature", "Temperature (0 = greedy)", float),
    ("sampling", "top_p", "Top-p", float),
    ("sampling", "top_k", "Top-k (0 = off)", int),
    ("sampling", "max_new_tokens", "Max new tokens", int),
    ("sampling", "seed", "Seed (-1 = random)", int),
    ("speculation", "gamma", "γ, draft tokens per round (auto or a number)", "gamma"),
    ("speculation", "gamma_max", "Largest adaptive γ", int),
    ("chat", "system_prompt", "System prompt of a new chat", str),
)
CHECK_FIELDS = (
    ("client", "tls_verify", "Verify the server's TLS certificate"),
    ("speculation", "pipeline", "Pipelining: draft the next round while one is verified"),
)


class SettingsDialog(QDialog):
    def __init__(self, *, base: Config, settings: UserSettings, api_key: str | None, key_store: str,
                 rows: list[DeviceRow], config_path: Path | None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("specd settings")
        self.base, self.settings, self.config_path = base, settings, config_path
        self.result_settings: UserSettings | None = None
        self.result_api_key: str | None = None
        current = to_dict(effective_config(config_path, settings))

        self.edits: dict[tuple[str, str], QLineEdit] = {}
        self.checks: dict[tuple[str, str], QCheckBox] = {}
        form = QFormLayout()
        for section, key, label, _kind in TEXT_FIELDS:
            edit = QLineEdit(str(current[section][key]))
            edit.setObjectName(f"{section}.{key}")
            self.edits[(section, key)] = edit
            if (section, key) == ("models", "draft"):
                form.addRow(label, self._with_browse(edit))
            else:
                form.addRow(label, edit)
            if (section, key) == ("client", "server_url"):
                self.api_key = QLineEdit(api_key or "")
                self.api_key.setEchoMode(QLineEdit.EchoMode.Password)
                self.api_key.setPlaceholderText("from $SPECD_API_KEY when empty")
                self.api_key.setToolTip(f"Kept in {key_store}")
                form.addRow("API key", self.api_key)
        self.device = QComboBox()
        self.device.setObjectName("desktop.device")
        self.device.addItem(f"Default: {device_words(base.devices.edge_device)}, as the config file says", "")
        for choice in ("auto", *KINDS):
            words = device_words(choice)
            self.device.addItem(words[:1].upper() + words[1:], choice)
        for row in rows:
            text = f"{row.name} — {row.backend} ({row.id})" + ("" if row.available else f": {row.reason}")
            self.device.addItem(text, row.id)
        index = self.device.findData(settings.desktop.device)
        if index < 0:
            self.device.addItem(settings.desktop.device, settings.desktop.device)
            index = self.device.count() - 1
        self.device.setCurrentIndex(index)
        form.addRow("Device", self.device)

        options = QGroupBox("Options")
        checks = QVBoxLayout(options)
        for section, key, label in CHECK_FIELDS:
            box = QCheckBox(label)
            box.setObjectName(f"{section}.{key}")
            box.setChecked(bool(current[section][key]))
            self.checks[(section, key)] = box
            checks.addWidget(box)
        self.start_on_login = QCheckBox("Start specd when I sign in")
        self.start_on_login.setChecked(settings.desktop.start_on_login)
        self.highlight = QCheckBox("Highlight where each token came from (drafted here, from the verifier, local)")
        self.highlight.setChecked(settings.desktop.highlight_tokens)
        self.local_api = QCheckBox(f"Local API: serve specd to other apps at http://{base.api.host}:{base.api.port}/v1 "
                                   "(OpenAI) and /api (Ollama)")
        self.local_api.setObjectName("desktop.local_api")
        self.local_api.setChecked(settings.desktop.local_api)
        checks.addWidget(self.start_on_login)
        checks.addWidget(self.highlight)
        checks.addWidget(self.local_api)

        self.error = QLabel()
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #b00020;")
        self.error.hide()
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(options)
        layout.addWidget(self.error)
        layout.addWidget(buttons)
        self.setMinimumWidth(560)

    def _with_browse(self, edit: QLineEdit) -> QWidget:
        box = QWidget()
        row = QHBoxLayout(box)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(edit)
        browse = QPushButton("Folder…")
        browse.clicked.connect(lambda: self._browse(edit))
        row.addWidget(browse)
        return box

    def _browse(self, edit: QLineEdit) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Draft model folder")
        if folder:
            edit.setText(folder)

    # -- reading the form -------------------------------------------------------------------------
    def form_layer(self) -> dict[str, Any]:
        """The edited values that differ from ``config.toml``, nested like the file (ConfigError when a
        field is not even the right kind of value)."""
        base = to_dict(self.base)
        layer: dict[str, dict[str, Any]] = {}
        for (section, key), edit in self.edits.items():
            kind = next(k for s, n, _label, k in TEXT_FIELDS if (s, n) == (section, key))
            value = _parse(edit.text().strip(), kind, f"[{section}] {key}")
            if value != base[section][key]:
                layer.setdefault(section, {})[key] = value
        for (section, key), box in self.checks.items():
            if box.isChecked() != base[section][key]:
                layer.setdefault(section, {})[key] = box.isChecked()
        return layer

    def field_problem(self) -> str | None:
        """What is wrong with a field that config.toml's rules let through but cannot work."""
        url = self.edits[("client", "server_url")].text().strip()
        problem = server_url_problem(url)
        if problem:
            return f"Server URL: {problem}"
        try:
            resolve_source(self.edits[("models", "draft")].text())
        except ModelError as exc:
            return f"Draft model: {exc}"
        return None

    def accept(self) -> None:
        problem = self.field_problem()
        if problem:
            self.error.setText(f"Not saved: {problem}")
            self.error.show()
            return
        try:
            layer = self.form_layer()
            candidate = UserSettings(layer=layer, desktop=self.settings.desktop).with_desktop(
                device=self.device.currentData() or "", start_on_login=self.start_on_login.isChecked(),
                highlight_tokens=self.highlight.isChecked(), local_api=self.local_api.isChecked())
            effective_config(self.config_path, candidate)
        except ConfigError as exc:
            self.error.setText(f"Not saved: {exc}")
            self.error.show()
            return
        self.result_settings = candidate
        self.result_api_key = self.api_key.text().strip()
        super().accept()


def device_words(choice: str) -> str:
    """A device setting in plain words: "auto" → "automatic (best available: NPU, then GPU, then CPU)"."""
    if choice in ("", "auto"):
        return "automatic (best available: NPU, then GPU, then CPU)"
    return choice.upper() if choice in KINDS else choice


def server_url_problem(url: str) -> str | None:
    """Why ``url`` cannot reach a verifier (None when it can be tried)."""
    example = "e.g. ws://127.0.0.1:8765 or wss://verifier.example.com"
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError as exc:
        return f"{url!r} is not a valid URL ({exc}); {example}"
    if parsed.scheme not in ("ws", "wss"):
        return f"{url!r} must start with ws:// or wss://; {example}"
    if not parsed.hostname:
        return f"{url!r} has no host name; {example}"
    if port == 0:
        return f"{url!r}: port 0 cannot be connected to; {example}"
    return None


def _parse(text: str, kind: Any, name: str) -> Any:
    if kind is str:
        return text
    if kind == "gamma":
        if text.lower() == "auto":
            return "auto"
        kind = int
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        extra = ' or "auto"' if name.endswith("gamma") else ""
        raise ConfigError(f"{name}: {text!r} is not {what}{extra}") from None
