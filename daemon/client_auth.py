"""Who may open a session: the client keys in force, what each has used, and its limits.

:class:`ClientKeys` holds the keys file (daemon/client_keys.py) plus ``SPECD_API_KEY`` as the key named
``default``, indexed by the SHA-256 of each key: a bearer key is hashed once and looked up in a dict, so
a handshake costs the same with 1,000 keys as with one, and the only comparison is between digests
(``hmac.compare_digest``), never between a presented key and a stored one. ``reload()`` swaps in a new
table; a file that cannot be read or parsed leaves the previous table in force (and says why in the log),
so a typo never drops sessions or opens the door. :class:`ClientUsage` is one key's counters (shared by
its sessions, kept across reloads) and its token budget.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
from pathlib import Path

from specd.daemon.client_keys import (
    DEFAULT_NAME,
    KeyRecord,
    key_digest,
    read_keys_file,
    read_usage,
    usage_path,
    write_private,
)
from specd.daemon.metrics import ClientCounters
from specd.shared.errors import ConfigError

log = logging.getLogger("specd.daemon.keys")

BEARER = b"Bearer "


class ClientUsage:
    """One key's counters, its current limits (updated by a reload) and its ``tokens_per_minute`` budget.

    The budget is a token bucket holding one minute's worth, refilled continuously. Work is admitted
    while the bucket is not empty and charged when done, so the last request before the limit may
    overdraw it; the next one waits until the debt is refilled.
    """

    def __init__(self, record: KeyRecord, counters: ClientCounters, where: str) -> None:
        self.record = record
        self.counters = counters
        self.where = where  # the keys file, for messages
        self.allowance = float(record.tokens_per_minute)
        self._last: float | None = None
        self.dirty = False

    @property
    def name(self) -> str:
        return self.record.name

    def update(self, record: KeyRecord) -> None:
        if record.tokens_per_minute != self.record.tokens_per_minute:
            self.allowance = min(self.allowance, float(record.tokens_per_minute)) if self._last is not None \
                else float(record.tokens_per_minute)
        self.record = record

    def _refill(self, now: float) -> float:
        rate = self.record.tokens_per_minute / 60.0
        if self._last is not None:
            self.allowance = min(float(self.record.tokens_per_minute), self.allowance + (now - self._last) * rate)
        self._last = now
        return rate

    def over_limit(self, now: float) -> str | None:
        """Why this key may not run more model work now (None: it may)."""
        limit = self.record.tokens_per_minute
        if not limit:
            return None
        rate = self._refill(now)
        if self.allowance > 0:
            return None
        wait = math.ceil((1.0 - self.allowance) / rate)
        return (f"the key {self.name!r} is over its tokens_per_minute = {limit} ({self.where}); "
                f"try again in {wait} s")

    def session_limit(self) -> str | None:
        """Why this key may not open another session (None: it may)."""
        limit = self.record.max_sessions
        if limit and self.counters.sessions >= limit:
            return (f"the key {self.name!r} has its max_sessions = {limit} sessions open ({self.where}); "
                    "close one or try again later")
        return None

    def charge(self, tokens: int, *, prompt: bool = False, now: float | None = None) -> None:
        """Tokens the target ran for this key: a prompt's, or those a round or a stream produced."""
        counters = self.counters
        counters.tokens += tokens
        if prompt:
            counters.prompt_tokens += tokens
        counters.last_used = time.time()
        self.dirty = True
        if self.record.tokens_per_minute:
            self._refill(time.monotonic() if now is None else now)
            self.allowance -= tokens

    def round(self) -> None:
        self.counters.rounds += 1
        self.dirty = True

    def refused(self, reason: str) -> None:
        self.counters.refusals[reason] += 1

    def opened(self) -> None:
        self.counters.sessions += 1
        self.counters.sessions_total += 1
        self.counters.last_used = time.time()
        self.dirty = True

    def closed(self) -> None:
        self.counters.sessions -= 1


class ClientKeys:
    """The keys in force. ``env_key`` is the key of ``SPECD_API_KEY`` (named ``default``); ``path`` the keys
    file (None: none). Raises :class:`ConfigError` at construction when the file is unusable."""

    def __init__(self, path: Path | None, env_key: str | None, *, persist_usage: bool = True) -> None:
        self.path = path
        self.env_key = env_key or None
        self.persist_usage = persist_usage and path is not None
        self.by_digest: dict[bytes, KeyRecord] = {}
        self.usage: dict[str, ClientUsage] = {}
        self.required = self.env_key is not None
        self._stamp: tuple[int, int, int] | None = None
        self._file_seen = False
        self._seeded = False
        self._load()

    @property
    def where(self) -> str:
        return f"keys file {self.path}" if self.path else "SPECD_API_KEY"

    @property
    def active(self) -> int:
        return sum(1 for record in self.by_digest.values() if record.active)

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> None:
        self._apply(*self.read())

    def read(self) -> tuple[tuple[int, int, int] | None, dict[str, KeyRecord]]:
        """The file's state and its keys (touches nothing here: a reload runs it on a worker thread)."""
        stamp = self._stat()
        records = read_keys_file(self.path) if self.path is not None and stamp is not None else {}
        if stamp is None and self._file_seen:
            raise ConfigError(f"the keys file {self.path} is gone")
        return stamp, records

    def _apply(self, stamp: tuple[int, int, int] | None, records: dict[str, KeyRecord]) -> None:
        table = {record.digest: record for record in records.values()}
        if self.env_key is not None:
            digest = key_digest(self.env_key)
            if digest in table:
                raise ConfigError(f"SPECD_API_KEY holds the same key as [keys.{table[digest].name}] in {self.path}")
            table[digest] = KeyRecord(name=DEFAULT_NAME, digest=digest, created="")
        self._stamp = stamp
        self._file_seen = self._file_seen or stamp is not None
        self.required = self.required or stamp is not None
        self.by_digest = table
        self._seed()
        for record in table.values():
            usage = self.usage.get(record.name)
            if usage is None:
                self.usage[record.name] = ClientUsage(record, ClientCounters(record.name), self.where)
            else:
                usage.update(record)

    def _seed(self) -> None:
        """Counters start from what the usage file recorded (once, before any is created)."""
        if self._seeded or not self.persist_usage or self.path is None:
            return
        self._seeded = True
        for name, saved in read_usage(usage_path(self.path)).items():
            counters = ClientCounters(name)
            for field in ("tokens", "prompt_tokens", "rounds", "sessions_total"):
                value = saved.get(field, 0)
                setattr(counters, field, value if isinstance(value, int) and value >= 0 else 0)
            last = saved.get("last_used_unix", 0)
            counters.last_used = float(last) if isinstance(last, (int, float)) else 0.0
            self.usage[name] = ClientUsage(KeyRecord(name=name, digest=b"", created=""), counters, self.where)

    def changed(self) -> bool:
        """Whether the file differs from the one last read (a cheap stat, for the poll)."""
        return self._stat() != self._stamp

    async def reload(self) -> bool:
        """Re-read the file (parsed off the event loop: 1,000 keys take a while); on failure keep the keys in
        force. True when the new table is in force."""
        try:
            self._apply(*await asyncio.to_thread(self.read))
        except ConfigError as exc:
            self._stamp = self._stat()  # do not retry the same broken file every poll
            log.error("keys not reloaded, the previous ones stay in force: %s", exc)
            return False
        log.info("keys reloaded from %s: %d active, %d revoked", self.path, self.active,
                 len(self.by_digest) - self.active)
        return True

    def authenticate(self, values: list[str]) -> KeyRecord | None:
        """The record of the bearer key in the request's Authorization headers (revoked ones included);
        None for a missing, malformed or unknown key. The key is hashed, then found by its digest."""
        if len(values) != 1:  # none, or repeated
            return None
        given = values[0].encode("utf-8", "surrogateescape")
        if not given.startswith(BEARER):
            return None
        digest = key_digest(given[len(BEARER):].decode("utf-8", "surrogateescape"))
        record = self.by_digest.get(digest)
        if record is None or not hmac.compare_digest(record.digest, digest):
            return None
        return record

    def in_force(self, digest: bytes) -> bool:
        """Whether a session opened with this key may go on (its key is still there and not revoked)."""
        record = self.by_digest.get(digest)
        return record is not None and record.active

    def usage_of(self, record: KeyRecord) -> ClientUsage:
        return self.usage[record.name]

    def counters(self) -> list[ClientCounters]:
        return [usage.counters for usage in self.usage.values()]

    def save_usage(self) -> None:
        """Write the usage file if anything changed (atomically; the verifier's own file)."""
        if not self.persist_usage or self.path is None or not self._file_seen:
            return
        if not any(usage.dirty for usage in self.usage.values()):
            return
        data = {name: {"tokens": u.counters.tokens, "prompt_tokens": u.counters.prompt_tokens,
                       "rounds": u.counters.rounds, "sessions_total": u.counters.sessions_total,
                       "last_used_unix": round(u.counters.last_used, 3)}
                for name, u in sorted(self.usage.items())}
        try:
            write_private(usage_path(self.path), json.dumps(data, indent=1) + "\n")
        except OSError as exc:
            log.warning("cannot record key usage in %s (%s); keys list will show no usage",
                        usage_path(self.path), exc.strerror or exc)
            self.persist_usage = False
            return
        for usage in self.usage.values():
            usage.dirty = False
