"""A delaying TCP proxy on loopback: real sockets carry an emulated network round trip.

Every chunk read from one side is written to the other ``rtt_ms / 2`` later, in both directions and in
order, so a request/response pair over the proxy costs one extra ``rtt_ms`` — without throttling the
bandwidth. Two fault controls serve the reliability tests:

- :meth:`DelayProxy.drop` stalls both directions for a while, like a lost packet the sender retransmits
  after a timeout: nothing is lost, everything in flight arrives late and in order.
- :meth:`DelayProxy.cut` aborts every live connection (the peers see a reset), and optionally refuses new
  ones for a while (each is accepted and closed at once, so the client's handshake fails).

Use it inside an event loop (``async with DelayProxy(...)``) or from blocking code with
:class:`ThreadedProxy`, which runs it on its own loop in a daemon thread. The controls are thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class _Link:
    """One proxied connection: its two transports and the two pump tasks."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class DelayProxy:
    """Forward ``listen_host:port`` to ``target_host:target_port`` with ``rtt_ms`` of added round trip."""

    def __init__(self, target_host: str, target_port: int, *, rtt_ms: float = 0.0,
                 listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms}")
        self.target_host, self.target_port = target_host, target_port
        self.listen_host, self._listen_port = listen_host, listen_port
        self.rtt_ms = float(rtt_ms)
        self.bytes_up = 0  # client -> target
        self.bytes_down = 0  # target -> client
        self.accepted = 0
        self._stall_until = 0.0
        self._refuse_until = 0.0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- life cycle --------------------------------------------------------------------------------
    async def start(self) -> DelayProxy:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._accept, self.listen_host, self._listen_port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._cut_now(0.0)

    async def __aenter__(self) -> DelayProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return self._server.sockets[0].getsockname()[1]

    def url(self, scheme: str = "ws") -> str:
        """The URL a client uses to reach the target through the proxy, e.g. ``ws://127.0.0.1:40123``."""
        return f"{scheme}://{self.listen_host}:{self.port}"

    @property
    def connections(self) -> int:
        """Live proxied connections."""
        return len(self._links)

    # -- fault controls (thread-safe) ------------------------------------------------------------
    def drop(self, seconds: float) -> None:
        """Hold every byte in both directions until ``seconds`` from now (a stall, not a loss)."""
        self._stall_until = max(self._stall_until, time.monotonic() + seconds)

    def cut(self, *, refuse_s: float = 0.0) -> None:
        """Abort every live connection; refuse new ones for ``refuse_s`` seconds."""
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._cut_now(refuse_s)
        else:
            done = threading.Event()
            loop.call_soon_threadsafe(lambda: (self._cut_now(refuse_s), done.set()))
            done.wait(5.0)

    def _cut_now(self, refuse_s: float) -> None:
        self._refuse_until = time.monotonic() + refuse_s if refuse_s > 0 else 0.0
        for link in list(self._links):
            link.abort()
        self._links.clear()

    # -- forwarding -------------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if time.monotonic() < self._refuse_until:
            writer.transport.abort()
            return
        _no_delay(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        _no_delay(up_writer)
        link = _Link(client=writer, upstream=up_writer)
        self._links.add(link)
        link.tasks = [asyncio.create_task(self._pump(reader, up_writer, upward=True)),
                      asyncio.create_task(self._pump(up_reader, writer, upward=False))]
        try:
            _done, pending = await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
            if pending:  # one side ended: give the other its delayed bytes and a moment to close
                await asyncio.wait(pending, timeout=5.0 + self.rtt_ms / 1000.0)
        finally:
            self._links.discard(link)
            for task in link.tasks:
                task.cancel()
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upward: bool) -> None:
        """Read chunks as they come and deliver each one ``rtt/2`` (or the stall) later, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(queue, writer, upward=upward))
        try:
            while True:
                chunk = await reader.read(65536)
                queue.put_nowait((time.monotonic() + self.rtt_ms / 2000.0, chunk))
                if not chunk:
                    break
            await deliver
        except (ConnectionError, OSError):
            deliver.cancel()
        finally:
            if not deliver.done():
                deliver.cancel()
            with contextlib.suppress(BaseException):
                await deliver

    async def _deliver(self, queue: asyncio.Queue, writer: asyncio.StreamWriter, *, upward: bool) -> None:
        while True:
            due, chunk = await queue.get()
            while True:  # a stall may start or grow while this chunk waits
                wait = max(due, self._stall_until) - time.monotonic()
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if not chunk:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()
            if upward:
                self.bytes_up += len(chunk)
            else:
                self.bytes_down += len(chunk)


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ThreadedProxy:
    """A :class:`DelayProxy` on its own event loop in a daemon thread, for blocking code and for keeping
    the proxy's timing independent of a busy client loop. ``with ThreadedProxy(...) as proxy:``."""

    def __init__(self, target_host: str, target_port: int, *, rtt_ms: float = 0.0,
                 listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self.proxy = DelayProxy(target_host, target_port, rtt_ms=rtt_ms, listen_host=listen_host,
                                listen_port=listen_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="specd-netem", daemon=True)

    def start(self) -> ThreadedProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(10.0)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        self._loop.close()

    def __enter__(self) -> ThreadedProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.proxy.port

    def url(self, scheme: str = "ws") -> str:
        return self.proxy.url(scheme)

    @property
    def rtt_ms(self) -> float:
        return self.proxy.rtt_ms

    @rtt_ms.setter
    def rtt_ms(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {value}")
        self.proxy.rtt_ms = float(value)

    def drop(self, seconds: float) -> None:
        self.proxy.drop(seconds)

    def cut(self, *, refuse_s: float = 0.0) -> None:
        self.proxy.cut(refuse_s=refuse_s)

    @property
    def connections(self) -> int:
        return self.proxy.connections
