"""What the routes share: the pool, the default settings, the tokenizer, the served model's name, and
the two ways a request waits (racing the app's disconnection)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from specd.desktop.client.answer import Settings
from specd.desktop.serve.answering import AnswerStream
from specd.desktop.serve.errors import ApiError
from specd.desktop.serve.pool import ClientPool

T = TypeVar("T")
CLIENT_GONE = 499  # the app closed the connection: nobody reads this answer (nginx's name for it)


@dataclass
class ServeState:
    pool: ClientPool
    defaults: Settings
    tokenizer: Any
    configured_model: str  # the [models] target, until a verifier names its model in the handshake
    verifier_url: str

    @property
    def model(self) -> str:
        for client in self.pool.clients:
            if client.welcome is not None:
                self.configured_model = client.welcome.model  # remembered while the verifier is away
                break
        return self.configured_model

    def metadata(self) -> dict[str, Any]:
        """The model's entry beside its id: the draft, where it runs, the verifier, the load."""
        client = self.pool.clients[0] if self.pool.clients else None
        drafter = client.drafter if client is not None else None
        return {"target": self.model, "draft": drafter.model_name if drafter else None,
                "device": drafter.device if drafter else None, "backend": drafter.backend if drafter else None,
                "draft_precision": drafter.precision if drafter else None, "verifier": self.verifier_url,
                "connected": any(c.connected for c in self.pool.clients), "max_concurrent": self.pool.size,
                "in_flight": self.pool.in_flight, "answers": dict(self.pool.finished)}


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def error_json(error: ApiError, *, ollama: bool) -> Response:
    """``error`` in Ollama's shape (``/api/...``) or OpenAI's."""
    if error.status == CLIENT_GONE:
        return Response(status_code=CLIENT_GONE)
    response = json_response(error.ollama_body() if ollama else error.openai_body(), error.status)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def until_done(request: Request, answer: AnswerStream, work: Awaitable[T]) -> T:
    """``work``, unless the app disconnects first: then the answer stops and its client is freed."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ApiError):
        await task
    answer.abort()
    raise ApiError(CLIENT_GONE, "the client closed the connection", code="client_closed_request")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
