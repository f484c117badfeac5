"""What an answer mode needs of the connection, and nothing more: :class:`EdgeClient` is one.

The modes (speculation.py, cloud_local.py) take a :class:`Link`, so they depend on this narrow
protocol instead of on the client that chooses between them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from specd.desktop.drafters.base import Drafter
from specd.shared.protocol import ClientEvent, ClientSession


class Link(Protocol):
    @property
    def session(self) -> ClientSession:
        """The sans-I/O session of the open connection (it frames what :meth:`send` sends)."""

    @property
    def drafter(self) -> Drafter | None: ...

    async def send(self, frame: bytes) -> None:
        """Send one frame, paced under the server's rate; raises ``Disconnected``."""

    async def next_event(self, other: asyncio.Future | None, cancel: asyncio.Event) -> ClientEvent | None:
        """The next server event; None when ``other`` finished or ``cancel`` was set first."""

    async def in_drafter(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the drafter's one thread."""

    def eos_ids(self) -> frozenset[int]: ...

    def max_gamma(self, position: int) -> int:
        """The most drafts the server accepts in a round at ``position``."""
