"""Typed errors shared by both sides, and the stable error codes of the wire protocol."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable codes carried by the protocol's ``error`` message (docs/protocol.md lists them)."""

    BAD_FRAME = "bad_frame"  # not a decodable message (text frame, bad msgpack, unknown type)
    BAD_MESSAGE = "bad_message"  # decodable, but a field is missing, mistyped or out of range
    UNSUPPORTED_VERSION = "unsupported_version"
    TOKENIZER_MISMATCH = "tokenizer_mismatch"
    UNEXPECTED_MESSAGE = "unexpected_message"  # illegal in the session's current state
    REQUEST_ACTIVE = "request_active"
    UNKNOWN_REQUEST = "unknown_request"
    WRONG_MODE = "wrong_mode"
    PROMPT_TOO_LONG = "prompt_too_long"
    CONTEXT_FULL = "context_full"
    DRAFT_TOO_LONG = "draft_too_long"
    BAD_TOKEN = "bad_token"
    BAD_PROPOSAL = "bad_proposal"
    FRAME_TOO_LARGE = "frame_too_large"
    TOO_MANY_SESSIONS = "too_many_sessions"
    RATE_LIMITED = "rate_limited"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class SpecdError(Exception):
    """Base of every error specd raises on purpose; its message is meant for the user."""


class ConfigError(SpecdError):
    """The configuration (file, flags or environment) is wrong; the message names the key."""


class ModelError(SpecdError):
    """A model cannot be found, downloaded, loaded or converted; the message says what to do."""


class DeviceError(SpecdError):
    """A device or backend cannot run the draft model."""


class ProposalError(SpecdError):
    """A draft round is malformed (bad ids, probabilities or lengths); never a wrong answer."""


class ProtocolError(SpecdError):
    """A peer broke the wire protocol. ``code`` is an :class:`ErrorCode`; ``fatal`` closes the session."""

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool = False,
                 request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.request_id = request_id


class RemoteError(SpecdError):
    """The other side answered with an ``error`` message."""

    def __init__(self, code: str, message: str, *, fatal: bool = False,
                 request_id: int | None = None) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message
        self.fatal = fatal
        self.request_id = request_id
