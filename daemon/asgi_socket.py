"""A Starlette (ASGI) WebSocket in the shape the session driver expects of a websockets connection.

The Ray Serve replica (daemon/ray_serve.py) receives its WebSockets through FastAPI; the session
driver (daemon/connection.py) was written against websockets' ``ServerConnection``. This adapter gives
it exactly what it uses — ``recv``, ``send``, ``close(code, reason)``, ``close_code``,
``remote_address``, ``transport.abort()`` — and raises websockets' ``ConnectionClosed`` when the peer
is gone, so the driver and the sans-I/O session run unchanged. websockets enforces ``max_size`` itself
(close 1009); here the adapter does, since the Ray proxy's own limit is larger.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from websockets.exceptions import ConnectionClosed

CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_ABNORMAL = 1006


class AsgiSocket:
    """Wraps an accepted ``starlette.websockets.WebSocket`` (only its ASGI methods are used)."""

    def __init__(self, websocket: Any, max_frame_bytes: int) -> None:
        self._websocket = websocket
        self.max_frame_bytes = max_frame_bytes
        self.close_code: int | None = None
        self.close_timeout: float | None = None  # set by the driver; the proxy owns the closing handshake
        client = websocket.client
        self.remote_address: tuple[str, int] | None = (client.host, client.port) if client else None
        self.transport = self  # the driver aborts through ``ws.transport.abort()``

    async def recv(self) -> bytes | str:
        if self.close_code is not None:
            raise ConnectionClosed(None, None)
        try:
            message = await self._websocket.receive()
        except RuntimeError:  # Starlette: receive after the disconnect was delivered (to another task)
            self.close_code = self.close_code or CLOSE_ABNORMAL
            raise ConnectionClosed(None, None) from None
        if message["type"] == "websocket.disconnect":
            self.close_code = int(message.get("code") or 1005)
            raise ConnectionClosed(None, None)
        data = message.get("bytes")
        if data is None:
            data = message.get("text") or ""
        size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
        if size > self.max_frame_bytes:
            await self.close(CLOSE_MESSAGE_TOO_BIG, f"frame over {self.max_frame_bytes} bytes")
            raise ConnectionClosed(None, None)
        return data

    async def send(self, data: bytes) -> None:
        if self.close_code is not None:
            raise ConnectionClosed(None, None)
        try:
            await self._websocket.send_bytes(data)
        except asyncio.CancelledError:
            raise
        except Exception:  # Starlette and the proxy raise several kinds once the peer is gone
            self.close_code = self.close_code or CLOSE_ABNORMAL
            raise ConnectionClosed(None, None) from None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.close_code is not None:
            return
        self.close_code = code
        with contextlib.suppress(Exception):
            await self._websocket.close(code, reason)

    def abort(self) -> None:
        """Give up on a peer that reads nothing: the endpoint returns and the proxy drops the socket."""
        if self.close_code is None:
            self.close_code = CLOSE_ABNORMAL
