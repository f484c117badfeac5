"""The local API on Starlette and uvicorn: routes, the bearer key, CORS, errors in each API's shape,
and :class:`ApiServer`, which serves it on an event loop that is already running (the command's, or the
tray app's qasync loop) and stops it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import socket
import sys
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from specd.desktop.serve import ollama_routes, openai_routes
from specd.desktop.serve.browser_guard import BrowserGuard
from specd.desktop.serve.errors import AUTHENTICATION, NOT_FOUND, SERVER_ERROR, ApiError
from specd.desktop.serve.state import ServeState, error_json, json_response
from specd.shared.addresses import is_loopback
from specd.shared.errors import SpecdError

try:  # httptools' C parser: a request's way in costs a third of h11's (benchmarks/serve_overhead.py)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as HttpProtocol
except ImportError:
    from uvicorn.protocols.http.h11_impl import H11Protocol as HttpProtocol

log = logging.getLogger("specd.serve")


class BindError(SpecdError):
    """The API cannot listen where it was told to."""


def key_matches(api_key: str, header: str | None) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time (no timing oracle on the key)."""
    given = (header or "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, f"Bearer {api_key}".encode())


def error_response(request_path: str, error: ApiError) -> Response:
    return error_json(error, ollama=request_path.startswith("/api/"))


class KeyCheck:
    """Every path but ``/health`` needs the key when one is set (an ASGI middleware: no body is read)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.api_key and scope["path"] != "/health":
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            if not key_matches(self.api_key, header):
                error = ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <key>, "
                                      "the key in the variable that [api] api_key_env names",
                                 type=AUTHENTICATION, code="invalid_api_key")
                await error_response(scope["path"], error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request.url.path, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = NOT_FOUND if exc.status_code == 404 else "invalid_request_error"
    message = (f"no such endpoint: {request.method} {request.url.path}" if exc.status_code == 404 else
               f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else str(exc.detail))
    return error_response(request.url.path, ApiError(exc.status_code, message, type=kind))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("request failed", exc_info=exc)
    return error_response(request.url.path, ApiError(500, f"internal error: {exc}", type=SERVER_ERROR))


async def health(request: Request) -> Response:
    state: ServeState = request.app.state.serve
    return json_response({"status": "ok", "model": state.model, **state.metadata()})


def build_app(state: ServeState, *, api_key: str | None = None, cors_origins: tuple[str, ...] = (),
              host: str = "127.0.0.1") -> Starlette:
    """``host``: where the API listens; on loopback, requests addressed elsewhere are refused (browser_guard)."""
    middleware = [Middleware(BrowserGuard, loopback_only=is_loopback(host), cors_origins=cors_origins),
                  Middleware(KeyCheck, api_key=api_key)]
    if cors_origins:  # browsers only; never a wildcard unless [api] cors_origins lists "*"
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                        allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=[Route("/health", health, methods=["GET"]), *openai_routes.ROUTES, *ollama_routes.ROUTES],
                    middleware=middleware,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.serve = state
    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the command and the tray app own their signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listening_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise BindError(f"cannot listen on {host!r}: {exc}") from None
    try:
        if sys.platform != "win32":  # on Windows SO_REUSEADDR would let two servers share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        why = ("the port is in use (another specd serve, or another server)" if exc.errno == errno.EADDRINUSE
               else exc.strerror or str(exc))
        raise BindError(f"cannot listen on {host}:{port}: {why}") from None
    sock.setblocking(False)
    return sock


class ApiServer:
    """Serve ``app`` on ``host:port`` (0: a free port) in the running event loop."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        sock = listening_socket(self.host, self.port)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(self.app, http=HttpProtocol, ws="none", lifespan="off", loop="none",
                                log_config=None, access_log=False, timeout_graceful_shutdown=2,
                                timeout_keep_alive=60)  # apps ask now and then: keep their connection
        self._server = server = _EmbeddedServer(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if self._task.done():
                self._task.result()  # its error, if it failed to start
                raise BindError(f"the API did not start on {self.url}")
            await asyncio.sleep(0.01)
        log.info("local API on %s", self.url)

    async def wait(self) -> None:
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._server, self._task = None, None
