"""One answer of the local API: a lent edge client generates, stop sequences cut the text, and the
request's side reads text deltas as they come, then how the answer finished.

The answer runs in its own task, which returns its client to the pool however the request ends: an
app that disconnects only cancels the answer (:meth:`AnswerStream.abort`), and the client's verifier
request is cancelled and its session ready for the next request at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from specd.desktop.client.answer import Answer, Piece, Settings
from specd.desktop.client.connection import ConnectionFailed
from specd.desktop.client.edge_client import EdgeClient
from specd.desktop.client.stats_line import stats_line
from specd.desktop.serve.errors import ApiError, context_length_exceeded, verifier_unavailable
from specd.desktop.serve.pool import ClientPool
from specd.desktop.serve.stops import StopMatcher, tokens_through
from specd.shared.errors import ErrorCode, RemoteError, SpecdError

log = logging.getLogger("specd.serve")

TOO_LONG = frozenset({ErrorCode.PROMPT_TOO_LONG, ErrorCode.CONTEXT_FULL})


@dataclass(frozen=True, slots=True)
class AnswerRequest:
    """What one API request asks of the edge client. ``max_tokens_given``: the app set the length
    itself (so a prompt that leaves no room for it is an error, not a shorter answer)."""

    prompt_ids: list[int]
    settings: Settings
    stops: tuple[str, ...] = ()
    max_tokens_given: bool = False
    prompt_param: str = "messages"


@dataclass(frozen=True, slots=True)
class Finished:
    text: str
    finish_reason: str  # "stop" or "length", as both APIs name them
    prompt_tokens: int
    completion_tokens: int
    answer: Answer

    @property
    def specd(self) -> dict[str, Any]:
        """The stats line's figures, beside ``usage``: how the answer was made."""
        stats = self.answer.stats
        return {"mode": stats.mode, "acceptance_rate": round(stats.acceptance_rate, 4),
                "tokens_per_forward": round(stats.tokens_per_forward, 3), "device": stats.device,
                "backend": stats.backend, "draft_precision": stats.draft_precision,
                "local_tokens": stats.local_tokens, "cloud_tokens": stats.cloud_tokens,
                "tokens_per_second": round(stats.tokens_per_second, 2), "ttft_ms": round(stats.ttft_ms, 2),
                "total_ms": round(stats.total_ms, 2),
                "stats_line": stats_line(stats.to_json(), self.answer.finish_reason)}


class AnswerStream:
    """Iterate :meth:`deltas` for the answer's text; :attr:`finished` is set when it ends."""

    def __init__(self, pool: ClientPool, request: AnswerRequest) -> None:
        self.request = request
        self.matcher = StopMatcher(request.stops)
        self.finished: Finished | None = None
        self._pool = pool
        self._queue: asyncio.Queue[str | Finished | ApiError] = asyncio.Queue()
        self._client: EdgeClient | None = None
        self._aborted = False
        self.task = asyncio.create_task(self._run())

    def abort(self) -> None:
        """The app left: stop generating (the task still returns the client to the pool)."""
        self._aborted = True
        if self._client is not None:
            self._client.cancel()

    async def deltas(self) -> AsyncIterator[str]:
        """Text as it is committed; raises :class:`ApiError` when the answer fails."""
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, str):
                    yield item
                elif isinstance(item, Finished):
                    self.finished = item
                    return
                else:
                    raise item
        finally:
            if self.finished is None:
                self.abort()

    async def result(self) -> Finished:
        """The whole answer (non-streaming requests)."""
        async for _text in self.deltas():
            pass
        assert self.finished is not None
        return self.finished

    async def _run(self) -> None:
        try:
            async with self._pool.lease() as client:
                if self._aborted:
                    return
                self._client = client
                try:
                    answer = await client.generate(self.request.prompt_ids, self._fitted(client), self._on_piece)
                finally:
                    self._client = None
            self._pool.finished[answer.finish_reason or "unknown"] += 1
            self._queue.put_nowait(self._finish(client, answer))
        except ApiError as exc:
            self._queue.put_nowait(exc)
        except ConnectionFailed as exc:
            self._queue.put_nowait(verifier_unavailable(str(exc)))
        except RemoteError as exc:
            if exc.code in TOO_LONG:
                self._queue.put_nowait(context_length_exceeded(f"the verifier refused the prompt: {exc.message}",
                                                               self.request.prompt_param))
            else:
                self._queue.put_nowait(verifier_unavailable(f"{exc.message} [{exc.code}]"))
        except SpecdError as exc:
            self._queue.put_nowait(ApiError(500, str(exc), type="server_error"))
        except Exception as exc:  # never leave the request waiting on a queue nobody fills
            log.exception("answer failed")
            self._queue.put_nowait(ApiError(500, f"internal error: {exc}", type="server_error"))

    def _fitted(self, client: EdgeClient) -> Settings:
        """The settings within the verifier's limits (known once a client has shaken hands)."""
        settings, request = self.request.settings, self.request
        limits = client.welcome.limits if client.welcome is not None else None
        if limits is None:
            return settings
        prompt = len(request.prompt_ids)
        if limits.max_input_tokens and prompt > limits.max_input_tokens:
            raise context_length_exceeded(
                f"the prompt is {prompt} tokens; the verifier takes at most {limits.max_input_tokens}",
                request.prompt_param)
        room = limits.max_total_tokens - prompt if limits.max_total_tokens else settings.max_new_tokens
        if settings.max_new_tokens > room:
            if request.max_tokens_given or room < 1:
                raise context_length_exceeded(
                    f"the verifier's context is {limits.max_total_tokens} tokens; you asked for {prompt} in the "
                    f"prompt and {settings.max_new_tokens} in the answer", request.prompt_param)
            return replace(settings, max_new_tokens=room)
        return settings

    def _on_piece(self, piece: Piece) -> None:
        if self.matcher.stop is not None or self._aborted:
            return
        text = self.matcher.push(piece.text)
        if text:
            self._queue.put_nowait(text)
        if self.matcher.stop is not None and self._client is not None:
            self._client.cancel()  # the rest is not wanted: free the verifier now

    def _finish(self, client: EdgeClient, answer: Answer) -> Finished | ApiError:
        matcher = self.matcher
        if matcher.stop is not None:
            used = tokens_through(client.tokenizer, answer.token_ids, len(matcher.text) + len(matcher.stop))
            reason = "stop"
        else:
            if answer.finish_reason == "disconnected":
                return verifier_unavailable("lost it mid-answer and [client] on_disconnect is \"stop\"")
            tail = matcher.flush()
            if tail:
                self._queue.put_nowait(tail)
            used = len(answer.token_ids)
            reason = "length" if answer.finish_reason in ("length", "context") else "stop"
        return Finished(text=matcher.text, finish_reason=reason, prompt_tokens=len(self.request.prompt_ids),
                        completion_tokens=used, answer=answer)
