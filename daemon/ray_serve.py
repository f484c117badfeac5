"""The verifier as a Ray Serve application: one target model per replica, the WebSocket through Serve's ingress.

Each replica is a ``Verifier`` that loads its model but binds no port of its own: Serve's ingress
accepts the WebSocket at ``/`` (FastAPI ingress) — HAProxy handing the connection to the replica's own
HTTP server when the cluster runs with ``RAY_SERVE_ENABLE_HA_PROXY=1`` (the documented setup), else
Serve's Python proxy relaying each message — the replica checks the bearer key (HTTP 401 before any model
work), accepts, and hands the socket — wrapped by :class:`AsgiSocket` — to the same
``Verifier.serve_connection`` the standalone daemon runs: the same session driver, sans-I/O
``ServerSession``, model worker, limits and close codes. A session lives on one replica for its
connection's life; nothing is shared between replicas, so when one dies or drains its clients reconnect
and resume on another (docs/protocol.md §9).

Run it with ``serve run packaging/ray/serve.yaml``, ``serve deploy`` of the same file, or
``specd-verifier --ray ADDRESS``. Requires the ``cluster`` extra (``ray[serve]``); nothing else in specd
imports this module.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime, and with
# postponed ones Serve's class-based routes see `websocket` as a query parameter (close 1008).

import asyncio
import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import msgspec
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve import metrics as serve_metrics

from specd.daemon.asgi_socket import AsgiSocket
from specd.daemon.client_keys import with_keys_file
from specd.daemon.server import Verifier
from specd.shared import __version__
from specd.shared.config import Config, load_config, read_secret
from specd.shared.errors import ConfigError

log = logging.getLogger("specd.daemon.ray")

APP_NAME = "specd-verifier"
DEPLOYMENT_NAME = "Verifier"
# Each WebSocket is one of Serve's ongoing requests for its whole life; leave room for /healthz.
HTTP_HEADROOM = 4
METRICS_PERIOD_S = 1.0

app = FastAPI(title="specd verifier", docs_url=None, redoc_url=None, openapi_url=None)


class ReplicaMetrics:
    """Copies the replica's counters (daemon/metrics.py) into Ray Serve's metrics, once a second.

    Ray adds the deployment, replica and application tags, so the cluster's Prometheus sees rounds,
    accepted tokens and sessions per replica, and tokens, rounds and sessions per client key.
    """

    def __init__(self) -> None:
        self.rounds = serve_metrics.Counter("specd_rounds", description="Draft rounds verified.")
        self.drafted = serve_metrics.Counter("specd_drafted_tokens", description="Draft tokens received.")
        self.accepted = serve_metrics.Counter("specd_accepted_tokens", description="Draft tokens accepted.")
        self.streamed = serve_metrics.Counter("specd_cloud_tokens", description="Tokens generated in cloud mode.")
        self.sessions = serve_metrics.Gauge("specd_sessions", description="Open WebSocket sessions.")
        self._last = {"rounds": 0, "drafted": 0, "accepted": 0, "streamed": 0}
        # Per client key (the keys file), tagged client=NAME: what `keys list` shows for a single verifier.
        self.clients = {name: serve_metrics.Counter(f"specd_client_{name}", description=text, tag_keys=("client",))
                        for name, text in (("tokens", "Prompt tokens run plus tokens generated, by client key."),
                                           ("rounds", "Draft rounds verified, by client key."),
                                           ("sessions", "Sessions accepted, by client key."))}
        self._last_client: dict[tuple[str, str], int] = {}

    def publish(self, verifier: Verifier) -> None:
        current = verifier.metrics
        for name, counter in (("rounds", self.rounds), ("drafted", self.drafted), ("accepted", self.accepted),
                              ("streamed", self.streamed)):
            value = getattr(current, name)
            if value > self._last[name]:
                counter.inc(value - self._last[name])
            self._last[name] = value
        self.sessions.set(verifier.sessions)
        for counters in verifier.gate.keys.counters():
            for name, value in (("tokens", counters.tokens), ("rounds", counters.rounds),
                                ("sessions", counters.sessions_total)):
                last = self._last_client.get((counters.name, name), 0)
                if value > last:
                    self.clients[name].inc(value - last, tags={"client": counters.name})
                self._last_client[(counters.name, name)] = value


@serve.deployment(name=DEPLOYMENT_NAME, graceful_shutdown_timeout_s=20.0, health_check_period_s=5.0)
@serve.ingress(app)
class VerifierReplica:
    """One replica: a loaded target and the daemon's session machinery, fed by Serve's proxy."""

    async def __init__(self, config_path: str | None = None, overrides: dict[str, Any] | None = None,
                       threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        config = with_keys_file(load_config(config_path, overrides), config_path)
        # Replicas share the keys file (a path on every node, or a mounted Secret) but not its usage file.
        self.verifier = Verifier(config, persist_usage=False)
        if not self.verifier.gate.required and not config.server.insecure_no_auth:
            raise ConfigError(f"a Ray replica serves through the cluster's ingress and needs an API key: a keys "
                              f"file ([server] keys_file) on every node, or {config.server.api_key_env} on every "
                              "node (or [server] api_key_file), or [server] insecure_no_auth = true to accept "
                              "unauthenticated clients")
        replica = serve.get_replica_context().replica_id.unique_id
        self.verifier.server_name = f"specd-verifier {__version__} (ray replica {replica})"
        await self.verifier.load()
        self._metrics = ReplicaMetrics()
        self._publisher = asyncio.get_running_loop().create_task(self._publish_metrics())
        log.info("replica %s serving %s (%d-token vocabulary)", replica, self.verifier.target.name,
                 self.verifier.target.vocab_size)

    async def _publish_metrics(self) -> None:
        while True:
            self._metrics.publish(self.verifier)
            await asyncio.sleep(METRICS_PERIOD_S)

    @app.websocket("/")
    async def session(self, websocket: WebSocket) -> None:
        verifier = self.verifier
        allowed, why = verifier.gate.authorize(websocket, websocket.headers.getlist("authorization"))
        if not allowed:
            verifier.metrics.refusals["unauthorized"] += 1
            log.info("refused %s: %s", websocket.client, why)
            await websocket.send_denial_response(PlainTextResponse(
                "missing or wrong API key (Authorization: Bearer)\n", status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="specd"', "Cache-Control": "no-store"}))
            return
        if not verifier.ready or verifier.stopping:
            await websocket.send_denial_response(PlainTextResponse(
                "the verifier replica is shutting down\n", status_code=503, headers={"Retry-After": "5"}))
            return
        await websocket.accept()
        assert verifier.limits is not None
        await verifier.serve_connection(AsgiSocket(websocket, verifier.limits.max_frame_bytes),
                                        verifier.gate.key_of(websocket))

    @app.get("/healthz")
    async def healthz(self) -> Response:
        health = self.verifier.health()
        return JSONResponse(health, status_code=200 if health["ready"] else 503,
                            headers={"Cache-Control": "no-store"})

    def check_health(self) -> None:
        """Serve's own probe: a replica whose model is gone is restarted."""
        if self.verifier.target is None:
            raise RuntimeError("the target model is not loaded")

    async def __del__(self) -> None:
        """Drained (scale-down, upgrade, ``serve shutdown``): end each session so its client reconnects."""
        self._publisher.cancel()
        with contextlib.suppress(Exception):
            await self.verifier.drain()
            if self.verifier.engine is not None:
                await self.verifier.engine.close_all()


def deployment_options(config_path: str | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Serve options tied to the verifier's config: a replica takes at most max_sessions sessions."""
    limits = load_config(config_path, overrides).limits
    return {"max_ongoing_requests": limits.max_sessions + HTTP_HEADROOM}


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder for ``serve run`` / ``serve deploy`` (``import_path: specd.daemon.ray_serve:build_app``).

    ``args``: ``config`` (a config.toml path on every node; default: the built-in defaults),
    ``overrides`` (nested like the file, e.g. ``{"models": {"target": "..."}}``), ``threads`` (torch CPU
    threads per replica), ``deployment`` (Serve deployment options for programmatic use; in serve.yaml
    the ``deployments:`` section sets them instead).
    """
    config_path = args.get("config")
    overrides = args.get("overrides")
    options = deployment_options(config_path, overrides) | dict(args.get("deployment") or {})
    return VerifierReplica.options(**options).bind(config_path, overrides, args.get("threads"))


def serve_on_cluster(address: str, config: Config, threads: int | None = None) -> None:
    """``specd-verifier --ray ADDRESS``: deploy on the cluster, serve until SIGTERM/SIGINT, then remove the app.

    The whole config travels with the application, so the other nodes need no config file; the API key
    travels in the replicas' environment (Ray's runtime_env), under the name [server] api_key_env; the keys
    file ([server] keys_file) is read by each replica at the same path, so it must be present on every node.
    """
    import ray

    srv = config.server
    api_key = read_secret(srv.api_key_env, srv.api_key_file)
    if not api_key and not srv.insecure_no_auth and not (srv.keys_file and Path(srv.keys_file).exists()):
        raise ConfigError(f"--ray: the replicas need an API key: a keys file (--keys-file, present at the same path "
                          f"on every node), {srv.api_key_env} (or [server] api_key_file), or pass "
                          "--insecure-no-auth to accept unauthenticated clients")
    env = {srv.api_key_env: api_key} if api_key and not srv.api_key_file else {}
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray {address}: cannot connect to the Ray cluster: {exc}") from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": srv.host or "0.0.0.0", "port": srv.port})
        overrides = msgspec.to_builtins(config)
        serve.run(build_app({"overrides": overrides, "threads": threads}), name=APP_NAME, route_prefix="/")
        host = srv.host if srv.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        log.info("serving %s on ws://%s:%d through Ray Serve (cluster %s); Ctrl-C removes the application",
                 config.models.target, host, srv.port, address)
        stop.wait()
        log.info("removing the application from the cluster")
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
