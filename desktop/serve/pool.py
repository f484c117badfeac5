"""Edge clients lent to requests: up to ``[api] max_concurrent`` answers at once, the rest wait in order.

An :class:`~specd.desktop.client.edge_client.EdgeClient` answers one request at a time over its own
verifier session, with its own draft model (drafters keep per-sequence state and run on one thread).
The first client is built before the server starts, and more only when every client is busy, so a laptop that
never serves two apps at once loads one draft model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable

from specd.desktop.client.edge_client import EdgeClient

log = logging.getLogger("specd.serve")

ClientFactory = Callable[[], Awaitable[EdgeClient]]


class ClientPool:
    def __init__(self, factory: ClientFactory, size: int) -> None:
        self._factory = factory
        self.size = size
        self.clients: list[EdgeClient] = []
        self._idle: list[EdgeClient] = []
        self._waiters: deque[asyncio.Future[EdgeClient]] = deque()
        self._building = 0
        self.in_flight = 0  # requests holding a client
        self.finished: Counter[str] = Counter()  # answers by how they ended (eos, length, cancelled, …)
        self.on_change: Callable[[], object] | None = None  # the tray's status line counts requests

    @property
    def waiting(self) -> int:
        return sum(not w.done() for w in self._waiters)

    def add(self, client: EdgeClient) -> None:
        """A client built beforehand (the first, whose errors stop the server at start)."""
        self.clients.append(client)
        self._release(client)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[EdgeClient]:
        client = await self._acquire()
        self._count(+1)
        try:
            yield client
        finally:
            self._count(-1)
            self._release(client)

    async def _acquire(self) -> EdgeClient:
        if self._idle and not self._waiters:
            return self._idle.pop()
        if len(self.clients) + self._building < self.size and not self._waiters:
            self._building += 1
            try:
                client = await self._factory()
            finally:
                self._building -= 1
            self.clients.append(client)
            log.info("client %d of at most %d ready", len(self.clients), self.size)
            return client
        waiter: asyncio.Future[EdgeClient] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a client just as the request left
                self._release(waiter.result())
            raise

    def _release(self, client: EdgeClient) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(client)
                return
        self._idle.append(client)

    def _count(self, change: int) -> None:
        self.in_flight += change
        if self.on_change is not None:
            self.on_change()

    async def close(self) -> None:
        for waiter in self._waiters:
            waiter.cancel()
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        self.clients.clear()
        self._idle.clear()
