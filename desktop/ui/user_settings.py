"""The tray app's per-user settings: a small TOML file layered over ``config.toml``.

``<user config folder>/settings.toml`` holds two kinds of tables: config sections (``[client]``,
``[models]``, ``[sampling]``, ...; the same keys as ``config.toml``, applied as a layer over it) and
``[desktop]`` for what only the app knows (the chosen device row, start on login, highlighting). The
API key never goes in it: it lives in the OS keyring, or, where there is none, in a per-user file
readable only by the user. No Qt here, so it is tested and reused without a display.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from specd.shared.config import Config, dump_toml, load_config
from specd.shared.config_origins import ConfigLayer
from specd.shared.errors import ConfigError
from specd.shared.paths import user_config_dir

log = logging.getLogger("specd.desktop")

SETTINGS_FILE = "settings.toml"
SETTINGS_SOURCE = "Settings"  # how a config message names a value the user set in the app's dialog
API_KEY_FILE = "api_key"
KEYRING_SERVICE = "specd"
KEYRING_USER = "api-key"


@dataclass(frozen=True, slots=True)
class DesktopPrefs:
    """The ``[desktop]`` table: what the app remembers that ``config.toml`` has no key for."""

    device: str = ""  # a row id from device probing ("openvino:CPU"), a kind, "auto"; "" = the config's
    start_on_login: bool = False
    highlight_tokens: bool = True
    local_api: bool = False  # serve the OpenAI/Ollama-compatible API ([api] in config.toml) while running
    window_width: int = 0  # the chat window's size and sidebar width when last closed; 0: the default
    window_height: int = 0
    sidebar_width: int = 0


@dataclass(frozen=True, slots=True)
class UserSettings:
    """The per-user layer: config overrides (nested like the file) and the app's own preferences."""

    layer: dict[str, Any] = field(default_factory=dict)
    desktop: DesktopPrefs = DesktopPrefs()

    def with_layer(self, layer: dict[str, Any]) -> UserSettings:
        return replace(self, layer=layer)

    def with_desktop(self, **changes: Any) -> UserSettings:
        return replace(self, desktop=replace(self.desktop, **changes))


def settings_path(folder: Path | None = None) -> Path:
    return (folder or user_config_dir()) / SETTINGS_FILE


def read_settings(path: Path) -> UserSettings:
    """The settings file, or empty settings when there is none; ConfigError names a broken file."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return UserSettings()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the app's settings ({exc}); fix or delete the file") from None
    desktop_raw = raw.pop("desktop", {})
    known = DesktopPrefs.__dataclass_fields__
    unknown = sorted(set(desktop_raw) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} in [desktop]; allowed: {', '.join(known)}")
    try:
        desktop = DesktopPrefs(**desktop_raw)
    except TypeError as exc:
        raise ConfigError(f"{path}: [desktop]: {exc}") from None
    return UserSettings(layer=raw, desktop=desktop)


def write_settings(path: Path, settings: UserSettings) -> None:
    """Write atomically (a crash mid-write keeps the old file)."""
    tree = dict(settings.layer)
    tree["desktop"] = {name: getattr(settings.desktop, name) for name in DesktopPrefs.__dataclass_fields__}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text("# specd-desktop settings, written by the app; layered over config.toml\n" + dump_toml(tree),
                   encoding="utf-8")
    os.replace(tmp, path)


def effective_config(config_path: Path | None, settings: UserSettings, *, layer_source: str = "") -> Config:
    """``config.toml`` with the user's layer on top. A ConfigError names the bad key and where its value
    came from: ``layer_source`` (the settings file) for the user's layer, or "Settings" (the dialog)."""
    return load_config(config_path, layers=[ConfigLayer(settings.layer, layer_source or SETTINGS_SOURCE)])


# -- the API key: OS keyring, else a file only the user can read --------------------------------
class SecretStore:
    """Where the API key is kept. ``use_keyring=False`` forces the file (tests, locked keyrings)."""

    def __init__(self, folder: Path | None = None, *, use_keyring: bool = True) -> None:
        self.file = (folder or user_config_dir()) / API_KEY_FILE
        self.keyring = _usable_keyring() if use_keyring else None

    @property
    def where(self) -> str:
        return f"the OS keyring ({type(self.keyring).__name__})" if self.keyring else f"{self.file} (mode 0600)"

    def load(self) -> str | None:
        if self.keyring is not None:
            try:
                value = self.keyring.get_password(KEYRING_SERVICE, KEYRING_USER)
                if value:
                    return value
            except Exception as exc:  # a locked or broken backend: fall back to the file
                log.warning("cannot read the API key from the keyring: %s", exc)
        try:
            return self.file.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def save(self, key: str) -> None:
        """Store ``key`` (empty: forget it)."""
        if self.keyring is not None:
            try:
                if key:
                    self.keyring.set_password(KEYRING_SERVICE, KEYRING_USER, key)
                else:
                    _forget(self.keyring)
                self.file.unlink(missing_ok=True)
                return
            except Exception as exc:
                log.warning("cannot use the keyring (%s); keeping the API key in %s", exc, self.file)
        if not key:
            self.file.unlink(missing_ok=True)
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(key + "\n")
        os.chmod(self.file, 0o600)  # an existing file keeps its mode through os.open


def _forget(backend: Any) -> None:
    with contextlib.suppress(Exception):  # keyring.errors.PasswordDeleteError: nothing stored
        backend.delete_password(KEYRING_SERVICE, KEYRING_USER)


def _usable_keyring() -> Any:
    """The keyring backend when a real one is available (not the fail/null backends), else None."""
    try:
        import keyring
        from keyring.backends import fail

        backend = keyring.get_keyring()
    except Exception:
        return None
    name = type(backend).__module__ + "." + type(backend).__name__
    if isinstance(backend, fail.Keyring) or "null" in name.lower() or getattr(backend, "priority", 1) <= 0:
        return None
    return backend


# -- start on login -----------------------------------------------------------------------------
AUTOSTART_NAME = "specd"


def launch_command() -> list[str]:
    """How to start this app again: the bundled exe, the installed script, or the module."""
    import shutil

    if getattr(sys, "frozen", False):
        return [sys.executable]
    script = shutil.which("specd-desktop")
    return [script] if script else [sys.executable, "-m", "specd.desktop.ui.app"]


def autostart_file(home_config: Path | None = None) -> Path:
    """The XDG autostart entry (Linux and other freedesktop systems)."""
    base = home_config or Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "autostart" / "specd-desktop.desktop"


def set_start_on_login(enabled: bool, *, home_config: Path | None = None) -> str:
    """Add or remove the login entry; returns where it lives. Windows: the same HKCU Run value the
    installer's "Start specd when I sign in" writes; elsewhere an XDG autostart ``.desktop`` file."""
    if sys.platform == "win32":
        return _windows_run_key(enabled)
    path = autostart_file(home_config)
    if not enabled:
        path.unlink(missing_ok=True)
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(_desktop_quote(part) for part in [*launch_command(), "--minimized"])
    path.write_text("[Desktop Entry]\nType=Application\nName=specd\nComment=Chat through specd speculative "
                    f"decoding\nExec={command}\nIcon=specd\nTerminal=false\nX-GNOME-Autostart-enabled=true\n",
                    encoding="utf-8")
    return str(path)


def start_on_login_enabled(*, home_config: Path | None = None) -> bool:
    if sys.platform == "win32":
        return _windows_run_key(None) == "present"
    return autostart_file(home_config).is_file()


def _desktop_quote(part: str) -> str:
    if not any(c in part for c in ' \t"\'\\$`'):
        return part
    return '"' + part.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`") + '"'


def _windows_run_key(enabled: bool | None) -> str:
    import subprocess
    import winreg  # type: ignore[import-not-found]

    where = r"Software\Microsoft\Windows\CurrentVersion\Run"
    with winreg.OpenKey(winreg.HKEY_CURRENT_USER, where, 0, winreg.KEY_READ | winreg.KEY_SET_VALUE) as key:
        if enabled is None:
            try:
                winreg.QueryValueEx(key, AUTOSTART_NAME)
                return "present"
            except FileNotFoundError:
                return "absent"
        if enabled:
            winreg.SetValueEx(key, AUTOSTART_NAME, 0, winreg.REG_SZ,
                              subprocess.list2cmdline([*launch_command(), "--minimized"]))
        else:
            with contextlib.suppress(FileNotFoundError):
                winreg.DeleteValue(key, AUTOSTART_NAME)
    return rf"HKCU\{where}\{AUTOSTART_NAME}"
