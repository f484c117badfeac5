"""Set-up for the local API's tests: a real verifier on 127.0.0.1 with a tiny target, and `specd serve`'s
server (the same start as the command) on a free port, both in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from specd.daemon.server import Verifier
from specd.desktop.serve.service import LocalApi, start_local_api
from specd.shared.config import load_config

OFFLINE_URL = "ws://127.0.0.1:9"  # nothing listens on the discard port: a verifier that is down


def serve_config(draft, server_url: str, *, api: dict[str, Any] | None = None, client: dict[str, Any] | None = None,
                 speculation: dict[str, Any] | None = None):
    return load_config(None, overrides={
        "models": {"draft": str(draft), "draft_backend": "torch"},
        "client": {"server_url": server_url, "reconnect_max_s": 0.5, "connect_timeout_s": 2.0, **(client or {})},
        "api": {"host": "127.0.0.1", "port": 0, "api_key_env": "", **(api or {})},
        "speculation": speculation or None, "devices": {"edge_device": "cpu"}})


@contextlib.asynccontextmanager
async def serving(target, draft, *, limits: dict[str, Any] | None = None, verifier: bool = True,
                  **config: Any) -> AsyncIterator[tuple[Verifier | None, LocalApi]]:
    """The verifier (unless ``verifier=False``: then none is reachable) and the local API in front of it."""
    async with contextlib.AsyncExitStack() as stack:
        running = None
        if verifier:
            running = await stack.enter_async_context(Verifier(load_config(None, overrides={
                "models": {"target": str(target)}, "server": {"port": 0}, "limits": limits or None})))
        api = await start_local_api(serve_config(draft, running.url if running else OFFLINE_URL, **config),
                                    device="cpu")
        try:
            yield running, api
        finally:
            await api.stop()


async def raw_http(url: str, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
                   read_events: int | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 exchange over a plain socket: the status, headers and body bytes exactly as sent (no
    client library in between; only the chunked transfer coding is undone). ``read_events``: close after
    that many SSE events have arrived (a client leaving mid-stream)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    headers = {"Host": host, **(headers or {})}  # a test may address the request to another name
    head = [f"{method} {path} HTTP/1.1", f"Content-Length: {len(data)}",
            "Content-Type: application/json", "Connection: close",
            *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
    raw = b""
    try:
        while read_events is None or _body(raw).count(b"\n\n") < read_events:
            chunk = await asyncio.wait_for(reader.read(65536), 60)
            if not chunk:
                break
            raw += chunk
    finally:
        writer.close()
    header_block = raw.partition(b"\r\n\r\n")[0]
    lines = header_block.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers_out = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
    return status, headers_out, _body(raw)


def _body(raw: bytes) -> bytes:
    """The body of a (possibly partial) response, its chunked transfer coding undone."""
    header_block, _, rest = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in header_block.lower():
        return rest
    body = b""
    while b"\r\n" in rest:
        size_line, _, after = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0 or len(after) < size + 2:
            break
        body, rest = body + after[:size], after[size + 2:]
    return body


def sse_events(payload: bytes) -> list[bytes]:
    """The ``data:`` payloads of a server-sent-event stream, checking the framing on the way."""
    assert payload.endswith(b"\n\n"), payload[-40:]
    events = payload[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: ") and b"\n" not in event, event
    return [event[len(b"data: "):] for event in events]
