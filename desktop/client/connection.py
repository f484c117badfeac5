"""Opening a WebSocket to the verifier: auth, TLS with verification, errors a user can act on."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from specd.shared import __version__
from specd.shared.config import ClientConfig, read_secret
from specd.shared.errors import SpecdError


class Disconnected(SpecdError):
    """The connection to the verifier was lost."""


class ConnectionFailed(SpecdError):
    """The verifier could not be reached or refused us; ``retry`` says whether trying again may help."""

    def __init__(self, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    api_key: str | None = None
    tls_verify: bool = True
    ca_file: str = ""
    open_timeout: float = 10.0
    max_frame_bytes: int = 4 * 1024 * 1024

    @classmethod
    def from_config(cls, cfg: ClientConfig, url: str | None = None) -> Endpoint:
        return cls(url=url or cfg.server_url, api_key=read_secret(cfg.api_key_env, cfg.api_key_file),
                   tls_verify=cfg.tls_verify, ca_file=cfg.ca_file, open_timeout=cfg.connect_timeout_s)

    @property
    def display(self) -> str:
        parsed = urlparse(self.url)
        return f"{parsed.hostname}:{parsed.port or (443 if parsed.scheme == 'wss' else 80)}"


def _ssl_context(endpoint: Endpoint) -> ssl.SSLContext | None:
    if not endpoint.url.startswith("wss://"):
        return None
    context = ssl.create_default_context(cafile=endpoint.ca_file or None)
    if not endpoint.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def open_connection(endpoint: Endpoint) -> ClientConnection:
    """Connect and return the WebSocket; raise :class:`ConnectionFailed` with the reason."""
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    where = endpoint.display
    try:
        return await connect(endpoint.url, additional_headers=headers, ssl=_ssl_context(endpoint),
                             compression=None, open_timeout=endpoint.open_timeout,
                             max_size=endpoint.max_frame_bytes, proxy=None,
                             user_agent_header=f"specd/{__version__}")
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401:
            hint = ("set the key in SPECD_API_KEY or [client] api_key_file" if not endpoint.api_key
                    else "the key was refused (unknown or revoked); ask the server's operator for this "
                    "laptop's key (specd-verifier keys add NAME)")
            raise ConnectionFailed(f"the verifier at {where} requires an API key: {hint}", retry=False) from None
        if status == 503:
            raise ConnectionFailed(f"the verifier at {where} is still loading its model", retry=True) from None
        raise ConnectionFailed(f"the verifier at {where} answered HTTP {status}", retry=status >= 500) from None
    except ssl.SSLCertVerificationError as exc:
        raise ConnectionFailed(
            f"refused the certificate of {where}: {exc.verify_message}. The connection was not made; "
            "if the server uses a private CA, set [client] ca_file to its certificate", retry=False) from None
    except ssl.SSLError as exc:
        raise ConnectionFailed(f"TLS with {where} failed: {exc.reason or exc}; is it really a wss:// server?",
                               retry=False) from None
    except InvalidURI:
        raise ConnectionFailed(f"{endpoint.url!r} is not a valid ws:// or wss:// URL", retry=False) from None
    except (ConnectionRefusedError, socket.gaierror, TimeoutError, OSError) as exc:
        reason = "connection refused (is specd-verifier running?)" if isinstance(exc, ConnectionRefusedError) \
            else "timed out" if isinstance(exc, (TimeoutError, asyncio.TimeoutError)) \
            else ("the connection was reset during the TLS handshake; is it really a wss:// server (a plain "
                  "ws:// verifier does this)?") if isinstance(exc, ConnectionResetError) and _ssl_context(endpoint) \
            else f"{exc.strerror or exc or type(exc).__name__}"
        raise ConnectionFailed(f"cannot reach the verifier at {where}: {reason}", retry=True) from None
    except InvalidHandshake as exc:
        if isinstance(exc.__cause__, (EOFError, ConnectionError)):
            # Closed before any HTTP answer: a proxy or load balancer between us (retry), or a TLS port.
            hint = " (if it serves TLS, use a wss:// URL)" if endpoint.url.startswith("ws://") else ""
            raise ConnectionFailed(f"the connection to {where} was closed during the handshake{hint}",
                                   retry=True) from None
        hint = "; if it serves TLS, use a wss:// URL" if endpoint.url.startswith("ws://") else ""
        raise ConnectionFailed(f"{where} is not a specd verifier ({exc}){hint}", retry=False) from None


# Close codes a verifier (or a proxy in front of it) sends, in the words a user reads in the app.
CLOSE_MEANINGS = {
    1000: "the verifier closed the connection",
    1001: "the verifier is shutting down",
    1008: "the verifier closed the connection for breaking its rules",
    1009: "a message was too large for the verifier",
    1011: "the verifier hit an internal error",
    1013: "the verifier is overloaded; it will be tried again",
}


def plain_close_reason(exc: ConnectionClosed | None) -> str:
    """Why a connection ended, in plain words (websockets says "no close frame received or sent")."""
    rcvd, sent = (exc.rcvd, exc.sent) if exc is not None else (None, None)
    if rcvd is None and sent is None:
        return "the connection dropped (the verifier stopped, or the network failed)"
    if rcvd is None:  # this side closed and the verifier never answered: keepalive timeout, dead link
        return "the verifier stopped answering"
    meaning = CLOSE_MEANINGS.get(rcvd.code, f"the verifier closed the connection (code {rcvd.code})")
    return f"{meaning}: {rcvd.reason}" if rcvd.reason else meaning


def backoff_delays(maximum: float, first: float = 0.25):
    """Exponential backoff with jitter: 0.25 s, 0.5 s, 1 s … capped at ``maximum``."""
    delay = first
    while True:
        yield min(maximum, delay) * (0.75 + 0.5 * int.from_bytes(os.urandom(1), "big") / 255)
        delay = min(maximum, delay * 2)


async def reconnect(connect: Callable[[], Awaitable[object]], max_delay_s: float, *,
                    deadline_s: float | None = None,
                    on_refused: Callable[[ConnectionFailed], object] = lambda _exc: None) -> bool:
    """Retry ``connect`` with exponential backoff; False when refused for good or out of time."""
    loop = asyncio.get_running_loop()
    end = None if deadline_s is None else loop.time() + deadline_s
    for delay in backoff_delays(max_delay_s):
        if end is not None:
            if loop.time() >= end:
                return False
            delay = min(delay, max(0.0, end - loop.time()))
        await asyncio.sleep(delay)
        try:
            await connect()
            return True
        except ConnectionFailed as exc:
            if not exc.retry:
                on_refused(exc)
                return False
    return False  # pragma: no cover - backoff_delays never ends
