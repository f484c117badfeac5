"""A streamed answer as an ASGI response: the first event is written as soon as the first text exists,
an error before it is still a plain HTTP error, and an app that disconnects stops the answer.

Starlette's ``StreamingResponse`` would start only once the handler returned, after the first text, and
run the body in a task group of its own; this response waits for the first text itself, in the task
that sends it, which keeps a token's way from the edge client to the socket to one step of the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.types import Receive, Scope, Send

from specd.desktop.serve.answering import AnswerStream
from specd.desktop.serve.errors import ApiError
from specd.desktop.serve.state import error_json

Render = Callable[[], AsyncIterator[bytes]]


class AnswerResponse:
    """Send what ``render`` yields; an :class:`ApiError` raised before its first bytes becomes the
    response (status and body in the API's shape), and one raised later ends the stream."""

    def __init__(self, answer: AnswerStream, render: Render, media_type: str, *, ollama: bool = False,
                 headers: dict[str, str] | None = None) -> None:
        self.answer = answer
        self.render = render
        self.ollama = ollama
        self.headers = [(b"content-type", media_type.encode())]
        self.headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            chunks = self.render()
            try:
                first = await anext(chunks)
            except ApiError as exc:
                await error_json(exc, ollama=self.ollama)(scope, receive, send)
                return
            except StopAsyncIteration:
                first = b""
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self, receive: Receive) -> None:
        """The app closed the connection: stop generating (the client goes back to the pool by itself)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.answer.abort()
