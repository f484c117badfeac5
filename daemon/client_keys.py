"""The keys file: one named key per client, stored as a SHA-256 hash with its limits.

``[server] keys_file`` (default: ``keys.toml`` beside the config file in use; ``/etc/specd/keys.toml`` for
the packaged unit) is TOML, written by ``specd-verifier keys`` and read by the verifier at start, on
SIGHUP and when it changes::

    [keys.alice]
    sha256 = "9f86d0…"                # of the key; the key itself is shown once by `keys add`
    created = 2026-12-06T21:45:51Z
    max_sessions = 2                  # 0: only the server's [limits] max_sessions
    tokens_per_minute = 20000         # prompt + generated tokens of all its sessions; 0: no limit
    revoked = 2026-12-07T08:00:00Z    # once revoked

A key is 256 random bits, so one unsalted SHA-256 is as strong as a slow salted hash (nobody can
guess the preimage of a random 256-bit value) and lets the verifier find a key by its hash in one
dict lookup: the handshake costs the same with 1,000 keys as with one. The file must be private to
its owner (mode 0600): one readable by the group or by others is refused with an error naming it.
Usage (tokens, rounds, sessions, last use) is kept beside it in ``keys-usage.json``, written by the
verifier; ``keys list`` shows both.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import secrets
import stat
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec

from specd.shared.config import Config
from specd.shared.errors import ConfigError

# The name SPECD_API_KEY (the variable named by [server] api_key_env) is known by; no file entry may take it.
DEFAULT_NAME = "default"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
USAGE_FILE = "keys-usage.json"
KEY_PREFIX = "specd-"
HEADER = """\
# specd client keys: one named key per client. Manage with `specd-verifier keys add|list|revoke|set-limits`.
# Only SHA-256 hashes are stored; the verifier re-reads this file when it changes and on SIGHUP.
# Keep it private to its owner (mode 0600): the verifier refuses a file readable by others.
"""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One entry of the keys file."""

    name: str
    digest: bytes  # SHA-256 of the key
    created: str  # RFC 3339, UTC
    max_sessions: int = 0  # 0: no per-key limit
    tokens_per_minute: int = 0  # 0: no per-key limit
    revoked: str = ""  # RFC 3339 once revoked

    @property
    def active(self) -> bool:
        return not self.revoked

    def limits_text(self) -> str:
        parts = [f"max_sessions={self.max_sessions}" if self.max_sessions else "",
                 f"tokens_per_minute={self.tokens_per_minute}" if self.tokens_per_minute else ""]
        return ", ".join(p for p in parts if p) or "none"


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def new_key() -> str:
    """256 random bits, URL-safe; the prefix lets secret scanners recognise a leaked key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                          "or digit")
    return name


def keys_file_path(config: Config, config_path: str | Path | None) -> Path | None:
    """``[server] keys_file``, else ``keys.toml`` beside the config file in use (None without either)."""
    if config.server.keys_file:
        return Path(config.server.keys_file).expanduser()
    return Path(config_path).expanduser().resolve().parent / "keys.toml" if config_path else None


def with_keys_file(config: Config, config_path: str | Path | None) -> Config:
    """``config`` with ``[server] keys_file`` resolved (see :func:`keys_file_path`), so that it travels with the
    config (to Ray replicas, for one)."""
    path = keys_file_path(config, config_path)
    if path is None or config.server.keys_file:
        return config
    return msgspec.structs.replace(config, server=msgspec.structs.replace(config.server, keys_file=str(path)))


def check_private(path: Path, st: os.stat_result | None = None) -> None:
    """Refuse a keys file that its group or others may read or write."""
    st = st or path.stat()
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(f"the keys file {path} is readable or writable by others (mode {mode:04o}); it must be "
                          f"private to its owner: chmod 600 {path}")


def read_keys_file(path: Path) -> dict[str, KeyRecord]:
    """The file's keys by name; a missing file holds none. Errors name the file and the entry."""
    try:
        with open(path, "rb") as fh:
            check_private(path, os.fstat(fh.fileno()))
            raw = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except OSError as exc:  # permission denied, a folder, ...
        raise ConfigError(f"cannot read the keys file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the keys file {path} is not valid TOML: {exc}") from None
    unknown = set(raw) - {"keys"}
    if unknown:
        raise ConfigError(f"the keys file {path}: unknown table(s) {', '.join(sorted(unknown))}; only [keys.NAME]")
    records: dict[str, KeyRecord] = {}
    digests: set[bytes] = set()
    for name, entry in raw.get("keys", {}).items():
        record = _record(path, name, entry)
        if record.digest in digests:
            raise ConfigError(f"the keys file {path}: [keys.{name}] has the same key as another entry")
        digests.add(record.digest)
        records[name] = record
    return records


def _record(path: Path, name: str, entry: Any) -> KeyRecord:
    where = f"the keys file {path}, [keys.{name}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table")
    if not NAME_PATTERN.fullmatch(name) or name == DEFAULT_NAME:
        raise ConfigError(f"{where}: the name must be 1-64 letters, digits, '.', '_' or '-' and not "
                          f"{DEFAULT_NAME!r} (the name of SPECD_API_KEY)")
    unknown = set(entry) - {"sha256", "created", "max_sessions", "tokens_per_minute", "revoked"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ConfigError(f"{where}: sha256 must be 64 lowercase hex digits")
    limits = {}
    for key in ("max_sessions", "tokens_per_minute"):
        value = entry.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}: {key} must be an integer >= 0 (0: no limit)")
        limits[key] = value
    return KeyRecord(name=name, digest=bytes.fromhex(digest), created=_time(entry.get("created", "")),
                     revoked=_time(entry.get("revoked", "")), **limits)


def _time(value: Any) -> str:
    if isinstance(value, datetime.datetime):
        value = value.astimezone(datetime.UTC) if value.tzinfo else value
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def render_keys_file(records: dict[str, KeyRecord]) -> str:
    lines = [HEADER]
    for record in records.values():
        lines += [f"[keys.{record.name}]", f'sha256 = "{record.digest.hex()}"']
        if record.created:
            lines.append(f"created = {record.created}")
        lines += [f"max_sessions = {record.max_sessions}", f"tokens_per_minute = {record.tokens_per_minute}"]
        if record.revoked:
            lines.append(f"revoked = {record.revoked}")
        lines.append("")
    return "\n".join(lines)


def write_private(path: Path, text: str) -> None:
    """Atomically (the verifier may read it at any moment), mode 0600, keeping the old file's owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        try:
            old = path.stat()
            os.chown(tmp, old.st_uid, old.st_gid)
        except (FileNotFoundError, PermissionError):
            pass
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def add_record(records: dict[str, KeyRecord], name: str, key: str, *, max_sessions: int = 0,
               tokens_per_minute: int = 0) -> dict[str, KeyRecord]:
    check_name(name)
    if name == DEFAULT_NAME:
        raise ConfigError(f"the name {DEFAULT_NAME!r} is the key given in SPECD_API_KEY; choose another name")
    if name in records:
        raise ConfigError(f"a key named {name!r} exists already; choose another name (a revoked key keeps its name)")
    return {**records, name: KeyRecord(name=name, digest=key_digest(key), created=now_rfc3339(),
                                       max_sessions=max_sessions, tokens_per_minute=tokens_per_minute)}


def change_record(records: dict[str, KeyRecord], name: str, path: Path, **changes: Any) -> dict[str, KeyRecord]:
    if name not in records:
        known = ", ".join(records) or "none"
        raise ConfigError(f"no key named {name!r} in {path} (keys: {known})")
    return {**records, name: replace(records[name], **changes)}


def usage_path(keys_file: Path) -> Path:
    return keys_file.with_name(USAGE_FILE)


def read_usage(path: Path) -> dict[str, dict[str, Any]]:
    """The usage the verifier recorded, by key name ({} when there is none or it cannot be read)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}
