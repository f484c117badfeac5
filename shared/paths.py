"""Standard per-user (or per-service) folders for configuration, caches and logs."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "specd"


def user_config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP, appauthor=False))


def cache_dir(override: str = "") -> Path:
    """Model cache: the config's ``cache_dir``, ``$SPECD_CACHE_DIR``, systemd's ``CacheDirectory=``
    (``$CACHE_DIRECTORY``) when run as a service, otherwise the user cache folder."""
    for candidate in (override, os.environ.get("SPECD_CACHE_DIR", ""),
                      os.environ.get("CACHE_DIRECTORY", "").split(":")[0]):
        if candidate:
            return Path(candidate).expanduser()
    return Path(platformdirs.user_cache_dir(APP, appauthor=False))


def log_dir() -> Path:
    return Path(platformdirs.user_log_dir(APP, appauthor=False))


def state_dir() -> Path:
    env = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(env) if env else Path(platformdirs.user_data_dir(APP, appauthor=False))


def data_dir() -> Path:
    """Per-user data (the desktop's conversations): ``$SPECD_DATA_DIR``, else the user data folder
    (``%LOCALAPPDATA%\\specd``, ``~/.local/share/specd``)."""
    override = os.environ.get("SPECD_DATA_DIR", "")
    return Path(override).expanduser() if override else Path(platformdirs.user_data_dir(APP, appauthor=False))
