"""Ollama's API for the apps that speak only that: ``POST /api/chat``, ``POST /api/generate`` (NDJSON
streams: one JSON object per line, the last with ``"done": true`` and the counts), ``GET /api/tags``,
``POST /api/show``, ``GET /api/version``. Errors are ``{"error": "message"}``, as Ollama writes them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
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

# The Ollama API version whose endpoints and fields specd answers (apps check it for features).
OLLAMA_API_VERSION = "0.6.0"
NDJSON = "application/x-ndjson"


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def line(data: dict[str, Any]) -> bytes:
    return msgspec.json.encode(data) + b"\n"


def counts(finished: Finished) -> dict[str, Any]:
    """Ollama's final counts (durations in nanoseconds); ``specd`` says how the answer was made."""
    stats = finished.answer.stats
    total, first = int(stats.total_ms * 1e6), int(stats.ttft_ms * 1e6)
    return {"done_reason": finished.finish_reason, "total_duration": total, "load_duration": 0,
            "prompt_eval_count": finished.prompt_tokens, "prompt_eval_duration": first,
            "eval_count": finished.completion_tokens, "eval_duration": max(0, total - first), "specd": finished.specd}


async def chat(request: Request) -> Response:
    return await _answer(request, wire.ollama_chat, "messages",
                         lambda text: {"message": {"role": "assistant", "content": text}})


async def generate(request: Request) -> Response:
    return await _answer(request, wire.ollama_generate, "prompt", lambda text: {"response": text})


async def _answer(request: Request, parse: Callable[..., AnswerRequest], prompt_key: str,
                  text_field: Callable[[str], dict[str, Any]]) -> Response | AnswerResponse:
    state: ServeState = request.app.state.serve
    body = wire.parse_json(await request.body())
    stream = wire.flag(body, "stream", True)
    if not body.get(prompt_key):  # Ollama's way to load a model: nothing to answer
        return json_response({"model": state.model, "created_at": now(), **text_field(""), "done_reason": "load",
                              "done": True})
    answer = AnswerStream(state.pool, parse(body, state.defaults, state.tokenizer))
    if not stream:
        finished = await until_done(request, answer, answer.result())
        return json_response({"model": state.model, "created_at": now(), **text_field(finished.text), "done": True,
                              **counts(finished)})
    return AnswerResponse(answer, lambda: _lines(state.model, answer, text_field), NDJSON, ollama=True)


async def _lines(model: str, answer: AnswerStream, text_field: Callable[[str], dict[str, Any]]
                 ) -> AsyncIterator[bytes]:
    deltas = answer.deltas()
    first = await anext(deltas, None)  # an error before any text is still an HTTP error (AnswerResponse)
    if first:
        yield line({"model": model, "created_at": now(), **text_field(first), "done": False})
    try:
        async for text in deltas:
            yield line({"model": model, "created_at": now(), **text_field(text), "done": False})
    except ApiError as exc:
        yield line(exc.ollama_body())
        return
    assert answer.finished is not None
    yield line({"model": model, "created_at": now(), **text_field(""), "done": True, **counts(answer.finished)})


def _details() -> dict[str, Any]:
    return {"parent_model": "", "format": "specd", "family": "", "families": None, "parameter_size": "",
            "quantization_level": ""}


async def tags(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    model = state.model
    return json_response({"models": [{"name": model, "model": model, "modified_at": now(), "size": 0, "digest": "",
                                      "details": _details(), "specd": state.metadata()}]})


async def show(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    limits = next((c.welcome.limits for c in state.pool.clients if c.welcome is not None), None)
    info: dict[str, Any] = {"general.architecture": "specd"}
    if limits is not None:
        info["specd.context_length"] = limits.max_total_tokens
    return json_response({"modelfile": "", "parameters": "", "template": "", "details": _details(),
                          "model_info": info, "capabilities": ["completion"], "specd": state.metadata()})


async def version(_request: Request) -> Response:
    return json_response({"version": OLLAMA_API_VERSION})


ROUTES = [
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/version", version, methods=["GET"]),
]
