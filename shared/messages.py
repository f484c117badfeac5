"""Wire messages: msgpack maps with a ``type`` tag, one per binary WebSocket frame.

docs/protocol.md is the specification; these structs are its executable form. Field names are part
of the protocol: ``p`` is the target, ``q`` the draft.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from specd.shared.errors import ErrorCode, ProtocolError

PROTOCOL_VERSION = 1

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Millis = Annotated[float, msgspec.Meta(ge=0.0)]
FinishReason = Literal["eos", "stop", "length", "context", "cancelled"]
Mode = Literal["speculative", "cloud"]


class Sampling(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Sampling settings; temperature 0 is greedy, top_k 0 and top_p 1 disable those filters."""

    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0


class Limits(msgspec.Struct, frozen=True):
    """What the server enforces; announced in ``welcome`` so a client can stay inside it."""

    max_input_tokens: NonNegative
    max_total_tokens: NonNegative
    max_draft: NonNegative
    max_support: NonNegative
    max_frame_bytes: NonNegative
    max_messages_per_second: NonNegative = 0  # 0: no rate limit
    idle_timeout_s: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0  # a session without a message is closed; 0: never
    max_stream_tokens: NonNegative = 0  # the most one ``stream`` may ask for; 0: the server takes no ``stream``


# --- client → server --------------------------------------------------------------------------

class Hello(msgspec.Struct, tag="hello", frozen=True, forbid_unknown_fields=True):
    protocol: NonNegative
    tokenizer: str
    client: str = ""
    draft_model: str = ""


class Start(msgspec.Struct, tag="start", frozen=True, forbid_unknown_fields=True):
    request: NonNegative
    prompt: list[TokenId]
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1)]
    sampling: Sampling = Sampling()
    seed: NonNegative | None = None
    stop: list[TokenId] = []
    mode: Mode = "speculative"


class Draft(msgspec.Struct, tag="draft", frozen=True, forbid_unknown_fields=True):
    """γ draft tokens for positions ``position .. position+γ-1``.

    ``parent`` is the token the client assumes at ``position - 1``. For sampled requests each draft
    carries its sparse proposal: ``support`` ids (int32 LE) and probabilities (float32 LE) per token,
    row-major ``[γ, support]``. Greedy requests send ``support = 0`` and empty bytes.
    """

    request: NonNegative
    round: NonNegative
    position: NonNegative
    parent: TokenId
    tokens: list[TokenId]
    support: NonNegative = 0
    q_ids: bytes = b""
    q_probs: bytes = b""


class Stream(msgspec.Struct, tag="stream", frozen=True, forbid_unknown_fields=True):
    """Within a speculative request: the verifier generates the next ``tokens`` alone and streams them
    (``tokens`` messages), then takes drafts again. The same request, its KV cache kept."""

    request: NonNegative
    tokens: Annotated[int, msgspec.Meta(ge=1)]


class Cancel(msgspec.Struct, tag="cancel", frozen=True, forbid_unknown_fields=True):
    request: NonNegative


# --- server → client --------------------------------------------------------------------------
# A client ignores fields it does not know in server messages (docs/protocol.md §1): servers gain fields.

class Welcome(msgspec.Struct, tag="welcome", frozen=True):
    protocol: NonNegative
    session: str
    model: str
    tokenizer: str
    vocab_size: NonNegative
    eos: list[TokenId]
    limits: Limits
    server: str = ""
    # The verifier's forward for one decode step of a session joining now, in ms, as its forward cost
    # model predicts it at its present load (0: not stated): the cost of a streamed token before any stream.
    decode_step_ms: Millis = 0.0


class Started(msgspec.Struct, tag="started", frozen=True):
    request: NonNegative
    prompt_tokens: NonNegative
    cached_tokens: NonNegative  # prompt tokens whose KV the session already held (not recomputed)


class Verdict(msgspec.Struct, tag="verdict", frozen=True):
    """The first ``accepted`` drafts of ``round`` stand, then ``token`` (correction or bonus).

    ``verified``: how many drafts the server judged (its goodput budget may verify a prefix; drafts past
    it were not judged, not rejected); None from a server that judges every draft. ``suggested_gamma``:
    the γ the server would verify of the next round under its present load (0: no suggestion).
    ``decode_step_ms``: as in ``welcome``, the server's decode step for this session now (0: not stated).
    """

    request: NonNegative
    round: NonNegative
    position: NonNegative
    accepted: NonNegative
    token: TokenId
    finished: bool = False
    reason: FinishReason | None = None
    queue_ms: Millis = 0.0
    forward_ms: Millis = 0.0
    verified: NonNegative | None = None
    suggested_gamma: NonNegative = 0
    decode_step_ms: Millis = 0.0


class Discarded(msgspec.Struct, tag="discarded", frozen=True):
    """A draft built on a prefix that is no longer the committed one; nothing was computed."""

    request: NonNegative
    round: NonNegative
    position: NonNegative


class Tokens(msgspec.Struct, tag="tokens", frozen=True):
    """Cloud-only generation: tokens for positions ``position ..``, streamed as they are sampled.

    ``probs``: in a ``stream`` within a speculative request, each token's probability under the request's
    sampling, as the target sampled it (1 when greedy); empty in cloud mode and from older servers. With
    it the client's idle drafter can measure its acceptance on the streamed tokens (docs/protocol.md §3).
    """

    request: NonNegative
    position: NonNegative
    tokens: list[TokenId]
    finished: bool = False
    reason: FinishReason | None = None
    forward_ms: Millis = 0.0
    probs: list[Annotated[float, msgspec.Meta(ge=0.0)]] = []


class Cancelled(msgspec.Struct, tag="cancelled", frozen=True):
    request: NonNegative
    position: NonNegative  # committed length when the request stopped


class Error(msgspec.Struct, tag="error", frozen=True):
    code: str
    message: str
    request: NonNegative | None = None
    fatal: bool = False


ClientMessage = Hello | Start | Draft | Stream | Cancel
ServerMessage = Welcome | Started | Verdict | Discarded | Tokens | Cancelled | Error

_MAX_ERROR_TEXT = 300
_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(ClientMessage)
_server_decoder = msgspec.msgpack.Decoder(ServerMessage)


def encode(message: ClientMessage | ServerMessage) -> bytes:
    return _encoder.encode(message)


def _decode(decoder: msgspec.msgpack.Decoder, frame: bytes | str, max_bytes: int) -> object:
    if isinstance(frame, str):
        raise ProtocolError(ErrorCode.BAD_FRAME, "text frames are not part of the protocol; send binary msgpack")
    if max_bytes and len(frame) > max_bytes:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"frame of {len(frame)} bytes exceeds {max_bytes}")
    try:
        return decoder.decode(frame)
    except msgspec.ValidationError as exc:
        text = str(exc)
        # Not a map, or no known ``type``: not a message of this protocol at all.
        unknown = text.startswith("Expected `object`") or "`$.type`" in text or "field `type`" in text
        if len(text) > _MAX_ERROR_TEXT:  # msgspec quotes the peer's field names: never echo megabytes back
            text = text[:_MAX_ERROR_TEXT] + "…"
        code = ErrorCode.BAD_FRAME if unknown else ErrorCode.BAD_MESSAGE
        raise ProtocolError(code, f"invalid message: {text}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"undecodable frame: {exc}") from None
    except UnicodeDecodeError as exc:  # a msgpack str that is not UTF-8
        raise ProtocolError(ErrorCode.BAD_FRAME, f"undecodable frame: a string is not UTF-8 ({exc.reason})") from None
    except RecursionError:  # deep nesting msgspec has to skip (e.g. in an unknown field before `type`)
        raise ProtocolError(ErrorCode.BAD_FRAME, "undecodable frame: nested too deeply") from None


def decode_client(frame: bytes | str, max_bytes: int = 0) -> ClientMessage:
    """Decode a frame sent by a client; raises :class:`ProtocolError` with a stable code."""
    return _decode(_client_decoder, frame, max_bytes)  # type: ignore[return-value]


def decode_server(frame: bytes | str, max_bytes: int = 0) -> ServerMessage:
    """Decode a frame sent by a server; raises :class:`ProtocolError` with a stable code."""
    return _decode(_server_decoder, frame, max_bytes)  # type: ignore[return-value]
