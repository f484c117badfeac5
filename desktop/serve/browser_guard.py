"""Web pages in the laptop's browser cannot use the local API behind the user's back.

A page on any site can make the browser send a request to ``127.0.0.1``: a ``POST`` with a ``text/plain``
body needs no CORS preflight, and a hostile name that resolves to ``127.0.0.1`` (DNS rebinding) even lets
the page read the answer. Apps that call the API from outside a browser (editors, scripts, the ``openai``
package) send neither an ``Origin`` header nor a foreign ``Host``, so two checks close both holes
without touching them:

- ``Host``: when the API listens on loopback only, a request must be addressed to this machine
  (``localhost``, ``127.0.0.0/8``, ``[::1]``) — a rebound name is refused.
- ``Origin``: a request a browser sends on behalf of a page is refused unless the page is served from
  this machine or its origin is listed in ``[api] cors_origins``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from specd.desktop.serve.errors import ApiError
from specd.desktop.serve.state import error_json
from specd.shared.addresses import is_loopback

PERMISSION = "permission_error"


def is_loopback_name(host: str) -> bool:
    """A name of this machine as written in a URL or a ``Host`` header (no port); browsers resolve every
    ``*.localhost`` name to loopback (RFC 6761)."""
    return is_loopback(host) or host.lower().endswith(".localhost")


def host_name(header: str) -> str:
    """The name in a ``Host`` header: ``127.0.0.1:11435`` → ``127.0.0.1``, ``[::1]:80`` → ``[::1]``."""
    if header.startswith("["):
        return header.partition("]")[0] + "]"
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def origin_allowed(origin: str, cors_origins: tuple[str, ...]) -> bool:
    if "*" in cors_origins or origin in cors_origins:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and is_loopback_name(parts.hostname or "")


class BrowserGuard:
    """An ASGI middleware: refuses (403) requests a web page sent, before any body is read."""

    def __init__(self, app: ASGIApp, *, loopback_only: bool, cors_origins: tuple[str, ...]) -> None:
        self.app = app
        self.loopback_only = loopback_only
        self.cors_origins = cors_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self._refusal(dict(scope["headers"]))
            if error is not None:
                await error_json(error, ollama=scope["path"].startswith("/api/"))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: dict[bytes, bytes]) -> ApiError | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if self.loopback_only and host and not is_loopback_name(host_name(host)):
            return ApiError(403, f"the request is addressed to {host!r}, not to this machine: the local API "
                                 "listens on loopback and answers only requests to localhost, 127.0.0.1 or [::1]",
                            type=PERMISSION, code="foreign_host")
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and not origin_allowed(origin, self.cors_origins):
            return ApiError(403, f"requests from web pages at {origin} are refused; to let that page use the "
                                 "local API, list its origin in [api] cors_origins",
                            type=PERMISSION, code="foreign_origin")
        return None
