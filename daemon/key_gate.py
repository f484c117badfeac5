"""Where sessions meet the client keys: who may connect, which key a session runs under, and what a
reload does to the sessions already open.

The verifier asks :meth:`KeyGate.authorize` during the HTTP upgrade (a missing, unknown or revoked key
gets the same 401 as ever), :meth:`KeyGate.refusal` before a session starts (the key revoked meanwhile,
or at its ``max_sessions``), and tells it when a session opens and closes. :meth:`KeyGate.reload` —
on SIGHUP, or when :meth:`KeyGate.watch` sees the file change — swaps the table in and ends every open
session whose key is no longer in force with the fatal error ``key_revoked`` (close 1008), after the
round it is running; the sessions of other keys go on untouched.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from weakref import WeakKeyDictionary

from specd.daemon.client_auth import ClientKeys, ClientUsage
from specd.daemon.client_keys import KeyRecord
from specd.daemon.connection import SessionDriver
from specd.shared.errors import ErrorCode

log = logging.getLogger("specd.daemon.keys")

# How often the keys file is checked for changes (one stat) and the usage file rewritten (when changed).
KEYS_POLL_S = 1.0
USAGE_SAVE_S = 10.0


class KeyGate:
    def __init__(self, keys: ClientKeys) -> None:
        self.keys = keys
        self._upgraded: WeakKeyDictionary[Any, KeyRecord] = WeakKeyDictionary()  # connection → its key
        self._sessions: dict[SessionDriver, KeyRecord] = {}

    @property
    def required(self) -> bool:
        return self.keys.required

    def authorize(self, connection: Any, values: list[str]) -> tuple[bool, str]:
        """Whether the upgrade may go on, and (when refused) why, for the log: never the key itself."""
        if not self.keys.required:
            return True, ""
        record = self.keys.authenticate(values)
        if record is None:
            return False, "missing or wrong API key"
        if not record.active:
            self.keys.usage_of(record).refused(ErrorCode.KEY_REVOKED.value)
            return False, f"the key {record.name!r} is revoked"
        self._upgraded[connection] = record
        return True, ""

    def key_of(self, connection: Any) -> KeyRecord | None:
        return self._upgraded.pop(connection, None)

    def refusal(self, record: KeyRecord | None) -> tuple[ErrorCode, str] | None:
        """Why a session with this key may not start now (None: it may)."""
        if record is None:
            return None
        usage = self.keys.usage_of(record)
        if not self.keys.in_force(record.digest):
            why: tuple[ErrorCode, str] | None = (ErrorCode.KEY_REVOKED, f"the key {record.name!r} was revoked")
        else:
            limit = usage.session_limit()
            why = (ErrorCode.TOO_MANY_SESSIONS, limit) if limit else None
        if why is not None:
            usage.refused(why[0].value)
        return why

    def usage(self, record: KeyRecord | None) -> ClientUsage | None:
        return self.keys.usage_of(record) if record is not None else None

    def opened(self, driver: SessionDriver, record: KeyRecord | None) -> None:
        if record is not None:
            self._sessions[driver] = record
            self.keys.usage_of(record).opened()

    def closed(self, driver: SessionDriver) -> None:
        record = self._sessions.pop(driver, None)
        if record is not None:
            self.keys.usage_of(record).closed()

    def name_of(self, driver: SessionDriver) -> str:
        record = self._sessions.get(driver)
        return record.name if record is not None else "-"

    async def reload(self) -> None:
        """Re-read the keys; end the open sessions of every key no longer in force."""
        if not await self.keys.reload():
            return
        for driver, record in list(self._sessions.items()):
            if not self.keys.in_force(record.digest):
                log.info("session %s (%s): the key %r was revoked; closing it", driver.id, driver.peer, record.name)
                driver.end(ErrorCode.KEY_REVOKED, f"the key {record.name!r} was revoked")

    async def watch(self) -> None:
        """Reload when the file changes; record usage now and then. Runs until cancelled."""
        loop = asyncio.get_running_loop()
        saved_at = loop.time()
        while True:
            await asyncio.sleep(KEYS_POLL_S)
            try:
                if self.keys.changed():
                    await self.reload()
                if loop.time() - saved_at >= USAGE_SAVE_S:
                    saved_at = loop.time()
                    self.keys.save_usage()
            except Exception:  # a surprise must not end the watching: the next change is still read
                log.exception("watching the keys file failed; trying again")

    def save_usage(self) -> None:
        self.keys.save_usage()
