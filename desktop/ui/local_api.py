"""The tray app's Local API: ``specd serve``'s server, run on the app's event loop while Settings has
it on (off by default), with its own edge clients (the chat window keeps its own)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from specd.shared.config import Config

log = logging.getLogger("specd.desktop")


class LocalApiRunner:
    """Start, stop and describe the app's local API; ``on_change`` is called when requests come and go."""

    def __init__(self, on_change: Callable[[], object] | None = None) -> None:
        self.on_change = on_change
        self.api = None  # specd.desktop.serve.service.LocalApi while running
        self.error = ""  # why it is not running although it is on

    @property
    def url(self) -> str:
        return f"{self.api.url}/v1" if self.api is not None else ""

    @property
    def in_flight(self) -> int:
        return self.api.pool.in_flight if self.api is not None else 0

    async def apply(self, on: bool, config: Config, *, device: str | None, verifier_key: str | None) -> None:
        """Run it when ``on`` (restarted, so a changed config or device applies), stop it otherwise."""
        await self.stop()
        self.error = ""
        if not on:
            return
        from specd.desktop.serve.service import start_local_api  # the HTTP stack loads only when it is used

        try:
            self.api = await start_local_api(config, device=device, verifier_key=verifier_key,
                                             progress=lambda message: log.info("local API: %s", message))
        except Exception as exc:  # a port in use, a missing key: shown in the menu, the app goes on
            self.error = str(exc)
            log.warning("local API not started: %s", exc)
            return
        self.api.pool.on_change = self.on_change
        log.info("local API on %s", self.url)

    async def stop(self) -> None:
        api, self.api = self.api, None
        if api is not None:
            await api.stop()
