"""The verifier daemon: a websockets asyncio server around the target model.

On one port: the WebSocket protocol at ``/`` (docs/protocol.md), ``GET /healthz`` and ``GET /metrics``.
The port is bound before the model loads, so health checks see 503 (and clients "still loading")
instead of a refused connection. ``Verifier`` is also what tests and the demo embed::

    async with Verifier(config) as verifier:
        ...  # connect to verifier.url
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from specd.daemon.client_auth import ClientKeys
from specd.daemon.client_keys import KeyRecord
from specd.daemon.connection import SessionContext, SessionDriver, peer_address, refuse
from specd.daemon.engine import Engine, EngineLimits
from specd.daemon.key_gate import KeyGate
from specd.daemon.limits import effective_limits
from specd.daemon.metrics import Metrics
from specd.daemon.notify import Notifier, cancel_quietly, extend_start_timeout, run_watchdog, watchdog_interval
from specd.daemon.target import TargetModel
from specd.shared import __version__
from specd.shared import messages as m
from specd.shared.addresses import is_loopback
from specd.shared.config import Config, read_secret
from specd.shared.config_origins import Origins
from specd.shared.errors import ConfigError, ErrorCode
from specd.shared.models import resolve_source

log = logging.getLogger("specd.daemon")

# How long SIGTERM waits for in-flight rounds before closing the remaining connections anyway.
DRAIN_TIMEOUT_S = 10.0


class Verifier:
    """The verifier service: ``await start()`` loads the model and serves; ``await stop()`` drains."""

    def __init__(self, config: Config, *, api_key: str | None = None, notifier: Notifier | None = None,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S, origins: Origins | None = None,
                 persist_usage: bool = True) -> None:
        """``api_key``: the key named ``default`` (else ``SPECD_API_KEY`` or ``[server] api_key_file``); the
        named keys come from ``[server] keys_file``. ``persist_usage``: record key usage beside that file."""
        self.config = config
        self.origins = origins or Origins(traced=False)  # where each value came from, for warnings
        srv = config.server
        env_key = api_key if api_key is not None else read_secret(srv.api_key_env, srv.api_key_file)
        keys_file = Path(srv.keys_file).expanduser() if srv.keys_file else None
        self.gate = KeyGate(ClientKeys(keys_file, env_key, persist_usage=persist_usage))
        self._keys_watch: asyncio.Task | None = None
        self.notifier = notifier or Notifier()
        self.drain_timeout_s = drain_timeout_s
        self.metrics = Metrics()
        # One thread runs all model work, so the event loop keeps answering while a forward runs.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specd-model")
        self.target: TargetModel | None = None
        self.engine: Engine | None = None
        self.limits: m.Limits | None = None
        self._context: SessionContext | None = None
        self.server_name = f"specd-verifier {__version__}"
        self.drivers: set[SessionDriver] = set()
        self.ready = False
        self.stopping = False
        self._server: Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._drained = asyncio.Event()
        self._stopped = False
        self._port: int | None = None

    # -- properties -----------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the verifier is not started")
        return self._port

    @property
    def url(self) -> str:
        host = self.config.server.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.config.server.tls_cert else "ws"
        return f"{scheme}://{host}:{self.port}"

    @property
    def sessions(self) -> int:
        return len(self.drivers)

    # -- start and stop -------------------------------------------------------------------------
    async def __aenter__(self) -> Verifier:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind, load the model on the worker thread, then announce READY=1."""
        srv, lim = self.config.server, self.config.limits
        if not self.gate.required and not is_loopback(srv.host) and not srv.insecure_no_auth:
            raise ConfigError(f"refusing to listen on {srv.host or 'all interfaces'} without an API key: add one "
                              f"with `specd-verifier keys add NAME`, set {srv.api_key_env} (or [server] "
                              "api_key_file), or pass --insecure-no-auth to accept unauthenticated clients")
        context = self._ssl_context()
        resolve_source(self.config.models.target)  # a mistyped model fails now, not after binding
        self.notifier.notify(f"STATUS=loading {self.config.models.target}")
        if self.notifier.enabled:
            self._tasks.append(asyncio.get_running_loop().create_task(extend_start_timeout(self.notifier)))
        interval = watchdog_interval()
        if interval and self.notifier.enabled:
            watchdog = asyncio.get_running_loop().create_task(run_watchdog(self.notifier, interval))
        else:
            watchdog = None
        try:
            self._server = await serve(
                self.serve_connection, srv.host or None, srv.port, process_request=self._process_request, ssl=context,
                max_size=lim.max_frame_bytes, compression=None, ping_interval=20, ping_timeout=20,
                server_header=f"specd-verifier/{__version__}")
        except OSError as exc:
            await self._cancel_tasks(watchdog)
            raise ConfigError(f"cannot listen on {srv.host}:{srv.port}: {exc.strerror or exc}") from None
        self._port = int(next(iter(self._server.sockets)).getsockname()[1])
        log.info("listening on %s; loading %s", self.url, self.config.models.target)
        try:
            await self.load()
        except BaseException:
            await self._cancel_tasks(watchdog)
            self._server.close()
            await self._server.wait_closed()
            self._model_thread.shutdown(wait=False)
            raise
        await self._cancel_tasks()
        if watchdog is not None:
            self._tasks.append(watchdog)
        self.notifier.notify("READY=1", f"STATUS=serving {self.target.name} on {self.url}: 0 sessions")
        log.info("serving %s on %s (%s, %s), %d-token vocabulary", self.target.name, self.url, self.target.device,
                 str(self.target.dtype).removeprefix("torch."), self.target.vocab_size)

    async def load(self) -> None:
        """Load the target and its engine on the model thread, then become ready (a Ray Serve replica
        does only this: it binds no port of its own)."""
        srv, lim = self.config.server, self.config.limits
        loop = asyncio.get_running_loop()
        self.target = await loop.run_in_executor(self._model_thread, TargetModel.load, self.config,
                                                 lambda msg: log.info("%s", msg))
        self.limits = self._effective_limits(self.target)
        engine_limits = EngineLimits(max_sessions=lim.max_sessions, slot_len=self.limits.max_total_tokens,
                                     max_batch_tokens=lim.max_batch_tokens, kv_cache_gib=lim.kv_cache_gib,
                                     one_session_per_forward=not srv.batching,
                                     goodput_budget=lim.goodput_budget, max_draft=lim.max_draft)
        self.engine = await loop.run_in_executor(self._model_thread, Engine.create, self.target, engine_limits,
                                                 self._model_thread)
        self.metrics = Metrics()
        self.engine.on_forward = self.metrics.batch
        self._context = SessionContext(engine=self.engine, metrics=self.metrics, limits=self.limits,
                                       idle_timeout_s=lim.idle_timeout_s, server_name=self.server_name)
        keys = self.gate.keys
        if keys.path is not None and not keys.path.exists():
            log.info("no keys file at %s (yet): `specd-verifier keys add NAME` makes one; it is read when it appears",
                     keys.path)
        elif keys.required and not keys.active:
            log.warning("no active client key in %s: every client is refused until `specd-verifier keys add NAME`",
                        keys.where)
        elif keys.required:
            log.info("client keys: %d active (%s)", keys.active, keys.where)
        self._keys_watch = loop.create_task(self.gate.watch())
        self.ready = True

    async def reload_keys(self) -> None:
        """SIGHUP: re-read the keys file; sessions of revoked keys end, the others go on."""
        await self.gate.reload()

    async def stop(self) -> None:
        """Stop accepting, let in-flight rounds finish, close clients with 1001, free the model."""
        if self._stopped or self._server is None:
            return
        self._stopped = True
        self.stopping = True
        self.notifier.notify("STOPPING=1", f"STATUS=stopping: draining {self.sessions} sessions")
        log.info("stopping: draining %d session(s)", self.sessions)
        self._server.server.close()  # no new TCP connections
        await self.drain()
        self._server.close()  # closes what is left with 1001
        try:
            await asyncio.wait_for(self._server.wait_closed(), 5.0)
        except TimeoutError:
            log.warning("some connections did not close in time")
        await self._cancel_tasks(self._keys_watch)
        self.gate.save_usage()
        if self.engine is not None:
            await self.engine.close_all()
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                None, self._model_thread.shutdown, True), 10.0)
        except TimeoutError:
            log.warning("the model thread is still busy; exiting anyway")
        self.target = None
        self.engine = None
        self.ready = False
        self.notifier.close()
        log.info("stopped")

    async def drain(self) -> None:
        """Refuse new sessions, let in-flight rounds finish, then end each session with shutting_down."""
        self.stopping = True
        for driver in list(self.drivers):
            driver.shutdown()
        if self.drivers:
            try:
                await asyncio.wait_for(self._drained.wait(), self.drain_timeout_s)
            except TimeoutError:
                log.warning("%d session(s) still busy after %.0f s; closing them", self.sessions,
                            self.drain_timeout_s)

    async def _cancel_tasks(self, *extra: asyncio.Task | None) -> None:
        for task in [*self._tasks, *extra]:
            await cancel_quietly(task)
        self._tasks = []

    def _ssl_context(self) -> ssl.SSLContext | None:
        srv = self.config.server
        if not srv.tls_cert:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(srv.tls_cert, srv.tls_key)
        except FileNotFoundError as exc:
            raise ConfigError(f"TLS: {exc.filename} does not exist ([server] tls_cert / tls_key)") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"TLS: cannot use {srv.tls_cert} with {srv.tls_key}: {exc}") from None
        return context

    def _effective_limits(self, target: TargetModel) -> m.Limits:
        return effective_limits(self.config.limits, self.origins, max_positions=target.max_positions,
                                vocab_size=target.vocab_size, warn=log.warning)

    # -- HTTP -----------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Sessions served at once: ``max_sessions``, or fewer when the KV budget holds fewer."""
        return self.engine.capacity if self.engine is not None else self.config.limits.max_sessions

    def health(self) -> dict[str, Any]:
        target, engine = self.target, self.engine
        return {"model": target.name if target else self.config.models.target,
                "device": str(target.device) if target else self.config.server.device,
                "sessions": self.sessions, "capacity": self.capacity,
                "batched": engine.batched if engine is not None else None,
                "uptime": round(time.monotonic() - self.metrics.started_at, 3),
                "ready": self.ready and not self.stopping}

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            health = self.health()
            status = http.HTTPStatus.OK if health["ready"] else http.HTTPStatus.SERVICE_UNAVAILABLE
            return _response(status, json.dumps(health) + "\n", "application/json")
        if path == "/metrics":
            target = self.target
            body = self.metrics.render(target.name if target else self.config.models.target,
                                       str(target.device) if target else self.config.server.device,
                                       self.gate.keys.counters())
            return _response(http.HTTPStatus.OK, body, "text/plain; version=0.0.4; charset=utf-8")
        if path != "/":
            return _response(http.HTTPStatus.NOT_FOUND, "not found: the protocol is at /, health at /healthz\n")
        allowed, why = self.gate.authorize(connection, request.headers.get_all("Authorization"))
        if not allowed:
            self.metrics.refusals["unauthorized"] += 1
            log.info("refused %s: %s", peer_address(connection), why)
            return _response(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer)\n",
                             extra={"WWW-Authenticate": 'Bearer realm="specd"'})
        if not self.ready or self.stopping:
            text = "the verifier is shutting down\n" if self.stopping else "the verifier is loading its model\n"
            return _response(http.HTTPStatus.SERVICE_UNAVAILABLE, text, extra={"Retry-After": "5"})
        return None

    # -- WebSocket ------------------------------------------------------------------------------
    async def serve_connection(self, ws: ServerConnection, key: KeyRecord | None = None) -> None:
        """One accepted WebSocket until it closes (the Ray replica passes an adapter of the same shape, and
        the ``key`` it authorized; here the upgrade remembered it)."""
        key = key or self.gate.key_of(ws)
        if self.stopping or self._context is None:
            await refuse(ws, self.metrics, ErrorCode.SHUTTING_DOWN, "the verifier is shutting down")
            return
        if len(self.drivers) >= self.capacity:
            log.warning("refused %s: %d sessions already open", peer_address(ws), len(self.drivers))
            lim = self.config.limits
            why = (f"max_sessions = {lim.max_sessions}" if self.capacity >= lim.max_sessions else
                   f"the KV memory for {self.capacity} sessions ([limits] kv_cache_gib)")
            await refuse(ws, self.metrics, ErrorCode.TOO_MANY_SESSIONS,
                         f"the verifier is at {why}; try again later")
            return
        if (refusal := self.gate.refusal(key)) is not None:
            log.info("refused %s: %s", peer_address(ws), refusal[1])
            await refuse(ws, self.metrics, *refusal)
            return
        driver = SessionDriver(self._context, ws, self.gate.usage(key))
        self.gate.opened(driver, key)
        self.drivers.add(driver)
        self._drained.clear()
        self.metrics.sessions = len(self.drivers)
        self.metrics.sessions_total += 1
        self._status()
        name = key.name if key is not None else "-"
        log.info("session %s opened from %s, key %s", driver.id, driver.peer, name)
        try:
            await driver.run()
        finally:
            self.gate.closed(driver)
            self.drivers.discard(driver)
            self.metrics.sessions = len(self.drivers)
            if not self.drivers:
                self._drained.set()
            log.info("session %s closed (%s) from %s, key %s", driver.id, ws.close_code, driver.peer, name)
            self._status()

    def _status(self) -> None:
        if self.ready and not self.stopping and self._port is not None:  # no port: a Ray replica
            self.notifier.status(f"serving {self.target.name if self.target else '?'} on {self.url}: "
                                 f"{self.sessions} session{'s' if self.sessions != 1 else ''}")


def _response(status: http.HTTPStatus, body: str, content_type: str = "text/plain; charset=utf-8",
              extra: dict[str, str] | None = None) -> Response:
    data = body.encode()
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(data))
    headers["Cache-Control"] = "no-store"
    headers["Connection"] = "close"
    for key, value in (extra or {}).items():
        headers[key] = value
    return Response(status.value, status.phrase, headers, data)
