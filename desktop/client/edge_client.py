"""The edge client: drives the sans-I/O ``ClientSession`` over websockets and runs the drafter.

One ``EdgeClient`` holds one connection to a verifier and answers one request at a time; it is the
:class:`~specd.desktop.client.link.Link` the answer modes run over, and it chooses the mode. An
answer is speculative when a drafter is loaded, cloud-only otherwise. If the verifier disappears
mid-answer the client continues with the draft model alone (``on_disconnect = "local"``, marked
``local``) or stops cleanly (``"stop"``), reconnects with backoff, and resumes speculation on the same
conversation: the committed tokens are the single source of truth, so nothing is lost or repeated.

The client's estimates (acceptance, draft and verify times, round trip, the verifier's streaming rate)
outlive an answer: each answer starts in the mode they favour, the first from priors and the round trip
of the handshake (``estimates`` starts from a given controller instead, e.g. one that records the rounds).
``modes`` is the policy that chooses between rounds and streaming (a test may swap it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from specd.desktop.client.adaptive import EstimatePriors, GammaController, ModePolicy
from specd.desktop.client.answer import Answer, PieceCallback, Run, Settings
from specd.desktop.client.cloud_local import generate_cloud, generate_local
from specd.desktop.client.connection import (
    ConnectionFailed,
    Disconnected,
    Endpoint,
    open_connection,
    plain_close_reason,
    reconnect,
)
from specd.desktop.client.mode_chooser import ModeChooser
from specd.desktop.client.round_planner import SourceAcceptance
from specd.desktop.client.speculation import Speculation
from specd.desktop.drafters.base import Drafter
from specd.shared import __version__
from specd.shared import messages as m
from specd.shared.errors import ErrorCode, ProtocolError, SpecdError
from specd.shared.hf_models import eos_ids
from specd.shared.protocol import ClientEvent, ClientSession, RateLimiter, ServerFailed, Welcomed

log = logging.getLogger("specd.client")

# Errors that end the connection, not the request: the answer continues elsewhere or after reconnecting.
GOING_AWAY = frozenset({ErrorCode.SHUTTING_DOWN, ErrorCode.IDLE_TIMEOUT})
StatusCallback = Callable[[str, str], Any]  # (state, human message)


class EdgeClient:
    def __init__(self, endpoint: Endpoint, *, tokenizer: Any, fingerprint: str, drafter: Drafter | None = None,
                 on_disconnect: str = "local", reconnect_max_s: float = 30.0,
                 on_status: StatusCallback | None = None, estimates: GammaController | None = None) -> None:
        self.endpoint = endpoint
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.drafter = drafter
        self.on_disconnect = on_disconnect
        self.reconnect_max_s = reconnect_max_s
        self.on_status = on_status
        self.state = "offline"
        self.session = ClientSession(tokenizer=fingerprint)
        self.welcome: m.Welcome | None = None
        self._ws: ClientConnection | None = None
        self._inbox: asyncio.Queue = asyncio.Queue()  # frames, then Disconnected when the connection ends
        self._pending: deque[ClientEvent] = deque()  # events of a received frame not yet handed out
        self._reader: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specd-draft")
        self._bytes_sent = self._bytes_received = 0
        self._run: Run | None = None
        self._eos: frozenset[int] | None = None
        self._pace = RateLimiter(0)  # the server's message rate limit, from its welcome
        self._controller = estimates  # kept across answers (see _estimates); None: made at the first answer
        # Where a new controller's estimates start: the draft precision record's figures once the precision
        # is settled (desktop/precision/measure.py), else built-in guesses.
        self.estimate_priors: EstimatePriors | None = None
        self.modes: ModePolicy | None = None
        self._handshake_ms: float | None = None
        self._context_acceptance = SourceAcceptance()  # the context lookup's, kept across answers like the controller

    # -- connection -----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Shaken hands, and the connection is still open (the reader ends when it closes)."""
        return (self._ws is not None and self.welcome is not None and self._reader is not None
                and not self._reader.done())

    def set_state(self, state: str, message: str) -> None:
        if state != self.state:
            self.state = state
            log.info("%s: %s", state, message)
            if self.on_status is not None:
                self.on_status(state, message)

    async def connect(self) -> m.Welcome:
        """Open the connection and shake hands; raises ConnectionFailed or RemoteError."""
        await self._drop_connection()
        ws = await open_connection(self.endpoint)
        session = ClientSession(tokenizer=self.fingerprint, client=f"specd/{__version__}",
                                draft_model=self.drafter.model_name if self.drafter else "")
        try:
            with contextlib.suppress(ConnectionClosed):  # refused at once (e.g. full): its error is still readable
                await ws.send(session.hello())
            sent_at = time.perf_counter()
            frame = await asyncio.wait_for(ws.recv(), timeout=self.endpoint.open_timeout)
            self._handshake_ms = (time.perf_counter() - sent_at) * 1000.0
            events = session.receive(frame)
        except (ConnectionClosed, TimeoutError) as exc:
            await ws.close()
            raise ConnectionFailed(f"the verifier at {self.endpoint.display} closed the handshake: {exc}",
                                   retry=True) from None
        except ProtocolError as exc:
            await ws.close()
            raise ConnectionFailed(str(exc), retry=False) from None
        for event in events:
            if isinstance(event, ServerFailed):
                await ws.close()
                busy = event.error.code in (ErrorCode.TOO_MANY_SESSIONS, ErrorCode.SHUTTING_DOWN)  # try again later
                raise ConnectionFailed(f"the verifier refused this client: {event.error.message}", retry=busy)
            if isinstance(event, Welcomed):
                self.session, self._ws, self.welcome = session, ws, event.welcome
                if self._controller is not None:
                    self._controller.observe_network(self._handshake_ms or 0.0)
                    self._controller.observe_server_step(event.welcome.decode_step_ms)
                self._eos = frozenset(event.welcome.eos)
                self._pace = client_pacer(event.welcome.limits.max_messages_per_second)
                self._inbox = asyncio.Queue()
                self._pending.clear()
                self._reader = asyncio.create_task(self._read(ws, self._inbox))
                self.set_state("connected", f"connected to {self.endpoint.display} ({event.welcome.model})")
                return event.welcome
        await ws.close()
        raise ConnectionFailed("the verifier did not answer the handshake", retry=True)

    async def _read(self, ws: ClientConnection, inbox: asyncio.Queue) -> None:
        """Queue the frames as they arrive; the session receives them where the answer loop reads them
        (:meth:`next_event`), so its committed sequence is always what the answer has handled."""
        try:
            async for frame in ws:
                self._bytes_received += len(frame)
                inbox.put_nowait(frame)
            reason = plain_close_reason(ws.close_exc)
        except ConnectionClosed as exc:
            reason = plain_close_reason(exc)
        inbox.put_nowait(Disconnected(reason))
        if self._run is None and ws is self._ws:  # idle: say so now, not at the next answer
            self.set_state("offline", f"lost the verifier at {self.endpoint.display}: {reason}")

    async def _drop_connection(self) -> None:
        ws, reader = self._ws, self._reader
        self._ws, self._reader, self.welcome = None, None, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    async def close(self) -> None:
        await self._drop_connection()
        self.set_state("offline", "closed")
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def send(self, frame: bytes) -> None:
        if self._ws is None:
            raise Disconnected("not connected")
        wait = self._pace.delay(time.monotonic())
        if wait > 0.0:  # stay under the server's rate limit rather than be cut off by it
            await asyncio.sleep(wait)
            if self._ws is None:
                raise Disconnected("not connected")
        try:
            await self._ws.send(frame)
        except ConnectionClosed as exc:
            await self._drop_connection()  # else `connected` stays true and the answer retries a dead socket
            raise Disconnected(plain_close_reason(exc)) from None
        self._bytes_sent += len(frame)

    async def next_event(self, other: asyncio.Future | None, cancel: asyncio.Event) -> ClientEvent | None:
        """The next server event; None when ``other`` finished or cancel was set first. The session
        receives each frame here, in the answer loop, not when it arrives."""
        while not self._pending:
            frame = await self._next_frame(other, cancel)
            if frame is None:
                return None
            try:
                self._pending.extend(self.session.receive(frame))
            except ProtocolError as exc:
                await self._drop_connection()
                raise Disconnected(f"the verifier broke the protocol: {exc}") from None
        event = self._pending.popleft()
        if isinstance(event, ServerFailed) and event.error.code in GOING_AWAY:
            await self._drop_connection()
            raise Disconnected(event.error.message)  # the verifier is leaving: reconnect, resume
        return event

    async def _next_frame(self, other: asyncio.Future | None, cancel: asyncio.Event) -> bytes | str | None:
        getter = asyncio.ensure_future(self._inbox.get())
        waiters = {getter}
        cancel_wait = None
        if other is not None:
            waiters.add(other)
        if not cancel.is_set():
            cancel_wait = asyncio.ensure_future(cancel.wait())
            waiters.add(cancel_wait)
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if cancel_wait is not None:
                cancel_wait.cancel()
        if getter not in done:
            getter.cancel()
            return None
        item = getter.result()
        if isinstance(item, Disconnected):
            await self._drop_connection()
            raise item
        return item

    @property
    def drafter_executor(self) -> ThreadPoolExecutor:
        """The one thread the drafter runs on (drafters are not thread-safe)."""
        return self._pool

    async def in_drafter(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def eos_ids(self) -> frozenset[int]:
        """End-of-sequence ids: the verifier's (remembered from the last handshake), else the tokenizer's."""
        return self._eos if self._eos is not None else frozenset(eos_ids(self.tokenizer))

    def max_gamma(self, position: int) -> int:
        limits = self.welcome.limits if self.welcome else None
        if limits is None:
            return 64
        return max(1, min(limits.max_draft, limits.max_total_tokens - position))

    # -- answers --------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the answer in progress (it ends with reason ``cancelled``)."""
        if self._run is not None:
            self._run.cancel_event.set()

    def prompt_ids(self, conversation: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return list(ids)

    async def chat(self, conversation: list[dict[str, str]], settings: Settings,
                   on_piece: PieceCallback | None = None) -> Answer:
        return await self.generate(self.prompt_ids(conversation), settings, on_piece)

    async def generate(self, prompt_ids: list[int], settings: Settings,
                       on_piece: PieceCallback | None = None) -> Answer:
        """Generate one answer for ``prompt_ids``, streaming pieces to ``on_piece``."""
        if not prompt_ids:
            raise SpecdError("the prompt is empty")
        seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        controller = self._estimates(settings)
        run = Run.begin(prompt_ids, settings, seed, self.tokenizer, on_piece, controller=controller,
                        modes=self.modes, context_acceptance=self._context_acceptance)
        stats = run.stats
        if self.drafter is not None:
            drafter = self.drafter
            stats.on_drafter(drafter.device, drafter.backend, drafter.precision, drafter.precision_reason)
        sent0, received0 = self._bytes_sent, self._bytes_received
        self._run = run
        try:
            if not self.connected:
                await self._connect_first()
            while run.finish_reason is None and run.remaining > 0:
                if run.cancelled and not self.connected:
                    run.finish_reason = "cancelled"
                    break
                try:
                    if not self.connected:
                        if self.drafter is not None and self.on_disconnect == "local":
                            await self._answer_locally(run)
                        elif self.drafter is not None or not await self._wait_for_verifier(run):
                            run.finish_reason = "cancelled" if run.cancelled else "disconnected"
                        continue
                    if self.drafter is not None:
                        await Speculation(self, run).run_to_end()
                    else:
                        await generate_cloud(self, run)
                except Disconnected as exc:
                    self.set_state("offline", f"lost the verifier at {self.endpoint.display}: {exc}")
                    stats.on_reconnect()
            if run.finish_reason is None:
                run.finish_reason = "length"
        finally:
            self._run = None
            mode = "cloud-only" if self.drafter is None else "local" if stats.local_tokens else "speculative"
            stats.on_answer_end(mode, run.clock.ms(), self._bytes_sent - sent0, self._bytes_received - received0)
        return run.answer()

    def _estimates(self, settings: Settings) -> GammaController:
        """The controller every answer of this client shares (a new one if γ's bound changed), with γ
        fixed or adaptive as ``settings`` say; the mode chooser reads the same estimates."""
        controller = self._controller
        if controller is None or controller.gamma_max != settings.gamma_max:
            controller = GammaController(settings.gamma_max, settings.gamma, priors=self.estimate_priors)
            if self._handshake_ms is not None:
                controller.observe_network(self._handshake_ms)
            if self.welcome is not None:
                controller.observe_server_step(self.welcome.decode_step_ms)
            self._controller = controller
            if self.modes is None or isinstance(self.modes, ModeChooser):
                self.modes = ModeChooser(controller)
        controller.fixed = None if settings.gamma is None else max(1, min(settings.gamma, controller.gamma_max))
        return controller

    async def _answer_locally(self, run: Run) -> None:
        """The verifier is unreachable: the draft model answers alone while a reconnection is tried."""
        assert self.drafter is not None
        self.set_state("local", f"the verifier at {self.endpoint.display} is unreachable; continuing on the "
                                f"{self.drafter.device} draft model (marked local)")
        reconnector = asyncio.create_task(self._reconnect())
        try:
            await generate_local(self, run, reconnector)
        finally:
            if not reconnector.done():
                reconnector.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reconnector

    async def _reconnect(self, deadline_s: float | None = None) -> bool:
        return await reconnect(self.connect, self.reconnect_max_s, deadline_s=deadline_s,
                               on_refused=lambda exc: self.set_state("offline", str(exc)))

    async def _wait_for_verifier(self, run: Run) -> bool:
        """Cloud-only answers cannot continue offline: wait (bounded, cancellable) for the verifier."""
        self.set_state("offline", f"lost the verifier at {self.endpoint.display}; reconnecting")
        waiter = asyncio.create_task(self._reconnect(deadline_s=max(5.0, self.reconnect_max_s)))
        cancel = asyncio.create_task(run.cancel_event.wait())
        try:
            await asyncio.wait({waiter, cancel}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancel.cancel()
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            return False
        return waiter.result()

    async def _connect_first(self) -> None:
        """Connect before an answer. Speculative clients that may continue locally tolerate a verifier
        that is down (they start locally and keep reconnecting); others report why it failed."""
        try:
            await self.connect()
        except ConnectionFailed as exc:
            if not exc.retry or self.drafter is None or self.on_disconnect != "local":
                raise
            self.set_state("offline", str(exc))


def client_pacer(server_rate: int) -> RateLimiter:
    """Pace sends under a server's limit of ``server_rate`` messages per second (0: none), with margin:
    90 % of its rate and half its burst, so arrival jitter does not trip it."""
    return RateLimiter(0.9 * server_rate, burst=float(server_rate))

