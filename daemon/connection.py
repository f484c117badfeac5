"""One WebSocket connection: moves frames between the socket and a sans-I/O ``ServerSession``.

The session (shared/protocol/server.py) decides everything protocol-shaped; this driver only receives,
hands the model work the session asks for to the batched engine, and sends what the session says.
It sees the verifier through a narrow :class:`SessionContext`, not the server itself.
Messages are handled one at a time, in order (docs/protocol.md §8); while the target generates alone
(cloud mode, or a ``stream`` within a speculative request) a generation task streams tokens and the
reader keeps listening (for ``cancel``, or a ``stream`` asking for more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConcurrencyError, ConnectionClosed

from specd.daemon.client_auth import ClientUsage
from specd.daemon.engine import Engine
from specd.daemon.metrics import Metrics
from specd.daemon.rounds import cloud_token, decode_round, request_seed, round_verdict
from specd.shared import messages as m
from specd.shared.errors import ERROR_RULES, ErrorCode, ProposalError
from specd.shared.protocol import (
    CancelRequested,
    Close,
    DraftReceived,
    Send,
    ServerAction,
    ServerSession,
    StartRequested,
    StreamRequested,
)
from specd.shared.sampling import SamplingParams

log = logging.getLogger("specd.daemon.session")

# A client whose connection accepts no data for this long is dropped: websockets' own keepalive cannot
# notice (its ping waits behind the full buffer), and the idle timeout only watches what it sends.
SEND_TIMEOUT_S = 30.0
# After a fatal error the client's closing frame may sit behind frames it already sent (reading pauses
# once websockets' queue is full): discard those, and give up on the handshake after this long.
FATAL_CLOSE_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What a session driver needs of the verifier: the engine (and its target), metrics, limits."""

    engine: Engine
    metrics: Metrics
    limits: m.Limits
    idle_timeout_s: float
    server_name: str


class SessionDriver:
    """Runs one connection's session until the peer leaves, a fatal error, idleness or shutdown.

    Construct it only when the engine has a free slot (``engine.open()`` raises otherwise).
    """

    def __init__(self, context: SessionContext, ws: ServerConnection, client: ClientUsage | None = None) -> None:
        self.context = context
        self.client = client  # the client key's usage and limits (None: the verifier has no keys)
        self.metrics = context.metrics
        self.engine = context.engine
        self.ws = ws
        self.id = secrets.token_hex(6)
        target = context.engine.target
        self.session = ServerSession(session_id=self.id, model=target.name, tokenizer=target.fingerprint,
                                     vocab_size=target.vocab_size, eos=target.eos, limits=context.limits,
                                     server=context.server_name,
                                     decode_step_ms=context.engine.decode_step_ms())
        self.kv = context.engine.open()
        self.params = SamplingParams()
        self.seed = 0
        self.busy = False  # handling a message (a round in flight)
        self.stopping = False
        self._ending = (ErrorCode.SHUTTING_DOWN, "the verifier is shutting down")  # the fatal error stopping sends
        self._closing = False
        self._generation: asyncio.Task | None = None
        self.peer = peer_address(ws)

    # -- lifecycle ------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._read_loop()
        except ConnectionClosed:
            pass
        finally:
            if self._generation is not None:
                self._generation.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._generation
            self.session.close()
            self.engine.close(self.kv)  # the KV slot goes with the session
            if self.ws.close_code == 1009:
                self.metrics.refusals["frame_too_large"] += 1

    def shutdown(self) -> None:
        """The server is stopping: finish what is in flight, then close with 1001."""
        self.end(ErrorCode.SHUTTING_DOWN, "the verifier is shutting down")

    def end(self, code: ErrorCode, message: str) -> None:
        """End the session with a fatal error once the round or step in flight is done (shutdown, a revoked key)."""
        if self.stopping:
            return
        self.stopping = True
        self._ending = (code, message)
        if not self.busy and (self._generation is None or self._generation.done()):
            asyncio.get_running_loop().create_task(self.fail(code, message))


    async def fail(self, code: ErrorCode, message: str) -> None:
        """A fatal error from the driver's side: tell the peer (naming the active request) and close."""
        if self._closing:
            return
        self._closing = True
        request = self.session.request.start.request if self.session.request is not None else None
        actions = self.session.error(code, message, request=request, fatal=True)
        with contextlib.suppress(ConnectionClosed):
            await self._perform(actions)

    # -- reading --------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        idle = self.context.idle_timeout_s
        while not self._closing:
            if self.stopping:
                await self.fail(*self._ending)
                return
            try:
                frame = await asyncio.wait_for(self.ws.recv(), idle)
            except TimeoutError:
                if self._generation is not None and not self._generation.done():
                    continue
                log.info("session %s: idle for %.0f s, closing", self.id, idle)
                self.metrics.refusals[ErrorCode.IDLE_TIMEOUT.value] += 1
                await self.fail(ErrorCode.IDLE_TIMEOUT, f"no message for {idle:g} s; reconnect when needed")
                return
            self.busy = True
            try:
                await self._perform(self.session.receive(frame))
            finally:
                self.busy = False

    async def _perform(self, actions: list[ServerAction]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._count(action.message)
                await self._send(action.data)
            elif isinstance(action, Close):
                self._closing = True
                await self._close_now(action.code, action.reason)
            elif isinstance(action, StartRequested):
                await self._start(action)
            elif isinstance(action, DraftReceived):
                await self._verify(action)
            elif isinstance(action, StreamRequested):
                # The task of an earlier stream has sent its last token (or is sending it) and ends there.
                self._generation = asyncio.get_running_loop().create_task(self._generate(action.request))
            elif isinstance(action, CancelRequested):
                pass  # the generation loop sees session.cancel_requested after its current step

    async def _send(self, data: bytes | None, close: tuple[int, str] | None = None) -> None:
        """Send one frame (or close); a client that stops reading stalls only this session, not for long."""
        try:
            if close is not None:
                await asyncio.wait_for(self.ws.close(*close), SEND_TIMEOUT_S)
            else:
                assert data is not None
                await asyncio.wait_for(self.ws.send(data), SEND_TIMEOUT_S)
        except TimeoutError:
            log.warning("session %s (%s): the client read nothing for %.0f s; dropping it", self.id, self.peer,
                        SEND_TIMEOUT_S)
            self.metrics.refusals["send_timeout"] += 1
            self._closing = True
            self.ws.transport.abort()  # frees the slot and, in run(), the KV cache
            raise ConnectionClosed(None, None) from None

    async def _close_now(self, code: int, reason: str) -> None:
        """Close after a fatal error without waiting behind what the client sent before it."""
        self.ws.close_timeout = FATAL_CLOSE_TIMEOUT_S
        drain = asyncio.get_running_loop().create_task(self._discard_incoming())
        try:
            await self._send(None, (code, reason))
        finally:
            drain.cancel()

    async def _discard_incoming(self) -> None:
        # ConcurrencyError: the read loop is already receiving (a fatal error raised from another task).
        with contextlib.suppress(ConnectionClosed, ConcurrencyError):
            while True:
                await self.ws.recv()

    def _count(self, msg: m.ServerMessage | None) -> None:
        """Count what the session encoded (the message itself, never the frame decoded back)."""
        if isinstance(msg, m.Error):
            self.metrics.refusals[msg.code] += 1
            if self.client is not None:
                self.client.refused(msg.code)
            log.info("session %s (%s): %s: %s", self.id, self.peer, msg.code, msg.message)
        elif isinstance(msg, m.Discarded):
            self.metrics.discarded += 1

    # -- model work -----------------------------------------------------------------------------
    async def _start(self, action: StartRequested) -> None:
        start = action.start
        self.params = SamplingParams(temperature=start.sampling.temperature, top_k=start.sampling.top_k,
                                     top_p=start.sampling.top_p)
        self.seed = request_seed(start.seed)
        metrics = self.metrics
        if await self._over_budget():
            return
        try:
            cached = await self.engine.prefill(self.kv, action.tokens, action.reusable)
        except Exception as exc:
            await self._internal(exc, start.request)
            return
        metrics.requests[start.mode] += 1
        metrics.prefill_tokens += len(action.tokens) - 1 - cached
        metrics.cached_tokens += cached
        if self.client is not None:
            self.client.charge(len(action.tokens) - 1 - cached, prompt=True)
        await self._perform(self.session.started(cached))
        if start.mode == "cloud":
            self._generation = asyncio.get_running_loop().create_task(self._generate(start.request))

    async def _verify(self, action: DraftReceived) -> None:
        draft = action.draft
        try:
            drafts = decode_round(draft, action.greedy, self.session.vocab_size)
        except ProposalError as exc:
            await self._perform(self.session.error(ErrorCode.BAD_PROPOSAL, str(exc), request=draft.request))
            return
        if await self._over_budget():
            return
        committed = self.session.committed
        verdict = round_verdict(drafts, self.params, self.seed, len(committed))
        try:
            result, queue_s, run_s = await self.engine.run(self.kv, committed[:-1], [committed[-1], *draft.tokens],
                                                           verdict, drafts=len(draft.tokens))
        except Exception as exc:
            await self._internal(exc, draft.request)
            return
        # The rejected drafts stay in the KV until the next job rolls them back (O(1)).
        self.kv.acceptance.observe(result.verified, result.accepted)
        actions = self.session.verdict(result, queue_ms=queue_s * 1000.0, forward_ms=run_s * 1000.0,
                                       verified=result.verified, suggested_gamma=self.kv.suggested_gamma,
                                       decode_step_ms=self.engine.decode_step_ms())
        self.metrics.round(len(draft.tokens), result.accepted, run_s, queue_s, verified=result.verified)
        await self._perform(actions)
        if self.client is not None:
            self.client.round()
            self.client.charge(result.accepted + 1)

    async def _generate(self, request: int) -> None:
        """The target alone: sample one token per step and stream it, until a stop rule, cancel, or (for a
        ``stream`` within a speculative request) the last token it asked for."""
        session = self.session
        try:
            while True:
                if session.request is None or session.request.start.request != request:
                    return  # the request ended another way (an error naming it, a fatal error)
                if session.cancel_requested:
                    await self._perform(session.finish_cancel())
                    return
                if not session.streaming:
                    return  # every token a stream asked for was sent: drafts are taken again
                if self.stopping:
                    await self.fail(*self._ending)
                    return
                if await self._over_budget():
                    return
                try:
                    committed = session.committed
                    (token, prob), _queue_s, run_s = await self.engine.run(
                        self.kv, committed[:-1], [committed[-1]],
                        cloud_token(self.params, self.seed, len(committed)))
                except Exception as exc:
                    await self._internal(exc, request)
                    return
                if not session.streaming:
                    continue  # cancelled (or ended) during the step: its token is not sent
                self.metrics.streamed += 1
                if self.client is not None:
                    self.client.charge(1)
                actions, ended = session.stream([token], forward_ms=run_s * 1000.0, probs=[prob])
                # Decided before the send: while it is sent the reader may start the task of a new stream.
                done = ended or not session.streaming
                await self._perform(actions)
                if done:
                    return
        except ConnectionClosed:
            return
        finally:
            if self.stopping and not self._closing:
                asyncio.get_running_loop().create_task(self.fail(*self._ending))

    async def _over_budget(self) -> bool:
        """The client key is over its tokens_per_minute: end the session with ``rate_limited`` naming it."""
        why = self.client.over_limit(asyncio.get_running_loop().time()) if self.client is not None else None
        if why is not None:
            await self.fail(ErrorCode.RATE_LIMITED, why)
        return why is not None

    async def _internal(self, exc: Exception, request: int) -> None:
        log.error("session %s: the model failed on request %d: %s", self.id, request, exc, exc_info=exc)
        self.engine.reset(self.kv)  # its content is unknown now; the next request recomputes
        await self._perform(self.session.error(ErrorCode.INTERNAL, f"the target model failed: {exc}",
                                               request=request))


def peer_address(ws: ServerConnection) -> str:
    """``host:port`` of the client, for logs (``?`` when the socket no longer knows)."""
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        return "?"
    return f"{host}:{port}"


async def refuse(ws: ServerConnection, metrics: Metrics, code: ErrorCode, message: str) -> None:
    """Refuse a connection before any handshake (too many sessions, shutting down)."""
    metrics.refusals[code.value] += 1
    with contextlib.suppress(ConnectionClosed):
        await ws.send(m.encode(m.Error(code=code.value, message=message, fatal=True)))
        await ws.close(int(ERROR_RULES[code].close), code.value)
