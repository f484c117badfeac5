"""Typed errors shared by both sides, and the stable error codes of the wire protocol."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


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
    KEY_REVOKED = "key_revoked"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    """The WebSocket close codes the verifier ends a connection with."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """What an error code does to the connection and to the request it names.

    ``fatal``: ``"yes"`` (the server closes with ``close``), ``"before welcome"`` (fatal only during the
    handshake, then closed with 1002) or ``"no"``. ``ends_request``: an error whose ``request`` names the
    active request ends that request; one that does not end it leaves the active request running.
    """

    fatal: str
    ends_request: bool
    close: CloseCode = CloseCode.PROTOCOL_ERROR

    def is_fatal(self, *, handshake_done: bool) -> bool:
        return self.fatal == "yes" or (self.fatal == "before welcome" and not handshake_done)


# The one table of error behaviour: the session state machine and the daemon read it, and
# docs/protocol.md §7 is checked against it.
ERROR_RULES: dict[ErrorCode, ErrorRule] = {
    ErrorCode.BAD_FRAME: ErrorRule("before welcome", ends_request=False),
    ErrorCode.BAD_MESSAGE: ErrorRule("before welcome", ends_request=False),
    ErrorCode.UNSUPPORTED_VERSION: ErrorRule("yes", ends_request=False, close=CloseCode.POLICY_VIOLATION),
    ErrorCode.TOKENIZER_MISMATCH: ErrorRule("yes", ends_request=False, close=CloseCode.POLICY_VIOLATION),
    ErrorCode.UNEXPECTED_MESSAGE: ErrorRule("before welcome", ends_request=True),
    ErrorCode.REQUEST_ACTIVE: ErrorRule("no", ends_request=False),
    ErrorCode.UNKNOWN_REQUEST: ErrorRule("no", ends_request=False),
    ErrorCode.WRONG_MODE: ErrorRule("no", ends_request=False),
    ErrorCode.PROMPT_TOO_LONG: ErrorRule("no", ends_request=True),
    ErrorCode.CONTEXT_FULL: ErrorRule("no", ends_request=True),
    ErrorCode.DRAFT_TOO_LONG: ErrorRule("no", ends_request=True),
    ErrorCode.BAD_TOKEN: ErrorRule("no", ends_request=True),
    ErrorCode.BAD_PROPOSAL: ErrorRule("no", ends_request=True),
    ErrorCode.FRAME_TOO_LARGE: ErrorRule("no", ends_request=False),
    ErrorCode.TOO_MANY_SESSIONS: ErrorRule("yes", ends_request=False, close=CloseCode.TRY_AGAIN_LATER),
    ErrorCode.RATE_LIMITED: ErrorRule("yes", ends_request=True, close=CloseCode.POLICY_VIOLATION),
    ErrorCode.KEY_REVOKED: ErrorRule("yes", ends_request=True, close=CloseCode.POLICY_VIOLATION),
    ErrorCode.IDLE_TIMEOUT: ErrorRule("yes", ends_request=True, close=CloseCode.NORMAL),
    ErrorCode.SHUTTING_DOWN: ErrorRule("yes", ends_request=True, close=CloseCode.GOING_AWAY),
    ErrorCode.INTERNAL: ErrorRule("no", ends_request=True),
}


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
