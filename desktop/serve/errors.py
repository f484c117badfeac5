"""Errors of the local API, written in the shape each API's clients parse.

OpenAI's clients read ``{"error": {"message", "type", "param", "code"}}`` and raise a typed exception by
status (400 ``BadRequestError``, 401 ``AuthenticationError``, 503 ``InternalServerError``); Ollama's read
``{"error": "message"}``. One :class:`ApiError` carries what both need.
"""

from __future__ import annotations

from typing import Any

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"


class ApiError(Exception):
    """A request the API answers with ``status`` and a message naming what to change."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}


def bad_value(param: str, message: str) -> ApiError:
    """A 400 naming the parameter (``messages[1].content``, ``temperature``)."""
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


def unsupported(param: str, why: str) -> ApiError:
    """A 400 for a parameter specd cannot honour: refusing beats a silently wrong answer."""
    return ApiError(400, f"{param} is not supported by specd: {why}", param=param, code="unsupported_parameter")


def context_length_exceeded(message: str, param: str = "messages") -> ApiError:
    return ApiError(400, message, param=param, code="context_length_exceeded")


def verifier_unavailable(reason: str) -> ApiError:
    return ApiError(503, f"the verifier is unavailable: {reason}", type=SERVER_ERROR, code="verifier_unavailable")
