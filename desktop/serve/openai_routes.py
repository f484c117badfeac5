"""OpenAI's API: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``.

Streams are server-sent events exactly as OpenAI sends them: ``data: {json}`` lines each followed by a
blank line, a first chunk whose delta holds the role, one chunk per text delta, a last chunk with an
empty delta and ``finish_reason``, the usage chunk (``choices: []``) when ``stream_options.include_usage``
asks for it, then ``data: [DONE]``. Answers carry ``usage`` (real tokens) and beside it ``specd``: how
the answer was made (mode, acceptance, tokens per forward, device).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from specd.desktop.serve import wire
from specd.desktop.serve.answering import AnswerRequest, AnswerStream, Finished
from specd.desktop.serve.errors import ApiError
from specd.desktop.serve.state import ServeState, json_response, until_done
from specd.desktop.serve.streaming import AnswerResponse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def usage(finished: Finished) -> dict[str, int]:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


class Shape:
    """What differs between chat and text completions: the object names and where the text goes."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.prefix = "chatcmpl-" if chat else "cmpl-"
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def choice(self, text: str | None, finish_reason: str | None, *, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish_reason}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def whole(self, finished: Finished) -> dict[str, Any]:
        if not self.chat:
            return {"text": finished.text, "index": 0, "logprobs": None, "finish_reason": finished.finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": finished.text, "refusal": None},
                "logprobs": None, "finish_reason": finished.finish_reason}


CHAT, TEXT = Shape(chat=True), Shape(chat=False)


async def chat_completions(request: Request) -> Response:
    return await _complete(request, CHAT, wire.openai_chat)


async def completions(request: Request) -> Response:
    return await _complete(request, TEXT, wire.openai_completion)


async def _complete(request: Request, shape: Shape, parse: Callable[..., AnswerRequest]) -> Response | AnswerResponse:
    state: ServeState = request.app.state.serve
    body = wire.parse_json(await request.body())
    stream = wire.flag(body, "stream", False)
    include_usage = wire.stream_options(body) if stream else False
    if body.get("user") is not None and not isinstance(body.get("user"), str):
        raise wire.bad_value("user", "must be a string")
    answer = AnswerStream(state.pool, parse(body, state.defaults, state.tokenizer))
    head = {"id": shape.prefix + secrets.token_hex(12), "object": shape.object, "created": int(time.time()),
            "model": state.model}
    if not stream:
        finished = await until_done(request, answer, answer.result())
        return json_response({**head, "choices": [shape.whole(finished)], "usage": usage(finished),
                              "specd": finished.specd})
    chunk_head = {**head, "object": shape.chunk_object}
    return AnswerResponse(answer, lambda: _events(shape, chunk_head, answer, include_usage),
                          "text/event-stream; charset=utf-8", headers=SSE_HEADERS)


async def _events(shape: Shape, head: dict[str, Any], answer: AnswerStream, include_usage: bool
                  ) -> AsyncIterator[bytes]:
    extra = {"usage": None} if include_usage else {}
    deltas = answer.deltas()
    first = await anext(deltas, None)  # an error before any text is still an HTTP error (AnswerResponse)
    opening = sse({**head, "choices": [shape.choice(None, None, first=True)], **extra}) if shape.chat else b""
    if first:
        opening += sse({**head, "choices": [shape.choice(first, None)], **extra})
    yield opening  # one write for the role and the first text
    try:
        async for text in deltas:
            yield sse({**head, "choices": [shape.choice(text, None)], **extra})
    except ApiError as exc:  # after the headers: the error travels as an event, as OpenAI sends it
        yield sse(exc.openai_body())
        return
    finished = answer.finished
    assert finished is not None
    closing = sse({**head, "choices": [shape.choice(None if shape.chat else "", finished.finish_reason)], **extra,
                   "specd": finished.specd})
    if include_usage:
        closing += sse({**head, "choices": [], "usage": usage(finished)})
    yield closing + DONE


async def models(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    return json_response({"object": "list", "data": [{"id": state.model, "object": "model", "created": 0,
                                                     "owned_by": "specd", "specd": state.metadata()}]})


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
]
