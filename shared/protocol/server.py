"""The verifier's half of the session, sans-I/O (in the spirit of h11).

:class:`ServerSession` consumes client frames and returns actions for its driver; it never touches a
socket or a model, and reads the clock only for the rate limit unless given ``now``. ``daemon/`` moves
the bytes and runs the target. Proposals stay bytes here: the verifier decodes and checks their
content once (``shared/sampling.py``). docs/protocol.md describes the same machine in prose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from specd.shared import messages as m
from specd.shared.errors import ERROR_RULES, ErrorCode, ProtocolError
from specd.shared.protocol.codec import common_prefix, proposal_bytes
from specd.shared.protocol.ratelimit import RateLimiter
from specd.shared.protocol.states import ServerState, ServerTrigger, server_transition
from specd.shared.protocol.stopping import stop_reason


class VerifiedRound(Protocol):
    """What :meth:`ServerSession.verdict` needs of a verified round (``sampling.RoundResult`` is one)."""

    @property
    def accepted(self) -> int: ...

    @property
    def token(self) -> int: ...


# --- actions for the driver -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` as one binary frame: ``message`` encoded (the driver counts from ``message``)."""

    data: bytes
    message: m.ServerMessage | None = None

    @classmethod
    def of(cls, message: m.ServerMessage) -> Send:
        return cls(m.encode(message), message)


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with a WebSocket close code."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class StartRequested:
    """Run the prefill: the KV cache should hold ``tokens[:-1]``; ``reusable`` of them may be kept."""

    start: m.Start
    tokens: list[int]
    reusable: int


@dataclass(frozen=True, slots=True)
class DraftReceived:
    """Verify this round in one forward over ``[parent] + drafts``, then call ``ServerSession.verdict``.

    A sampled round's ``draft.q_ids``/``q_probs`` have the right size for its support; their content
    is unchecked until the verifier decodes them (a bad one: ``error(BAD_PROPOSAL, ...)``).
    """

    draft: m.Draft
    greedy: bool


@dataclass(frozen=True, slots=True)
class StreamRequested:
    """A speculative request asked for tokens generated alone: run the generation loop (as in cloud mode,
    with ``ServerSession.stream``) until the session leaves ``STREAMING_CHUNK``."""

    request: int


@dataclass(frozen=True, slots=True)
class CancelRequested:
    request: int


ServerAction = Send | Close | StartRequested | DraftReceived | StreamRequested | CancelRequested

STREAMING_STATES = (ServerState.STREAMING, ServerState.STREAMING_CHUNK)


@dataclass(slots=True)
class _Request:
    start: m.Start
    tokens: list[int]  # committed sequence: prompt + generated
    prompt_len: int
    last_round: int = -1
    cancel: bool = False
    chunk: int = 0  # tokens a ``stream`` asked for that are not sent yet

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


def _finish_reason(req: _Request, token: int, eos: frozenset[int], max_total: int) -> str | None:
    """Why generation ends after ``token`` was appended to ``req.tokens``, or None."""
    reason = stop_reason(token, eos, req.start.stop)
    if reason is not None:
        return reason
    if req.generated >= req.start.max_new_tokens:
        return "length"
    if len(req.tokens) >= max_total:
        return "context"
    return None


class ServerSession:
    """The verifier's half of one connection."""

    def __init__(self, *, session_id: str, model: str, tokenizer: str, vocab_size: int,
                 eos: list[int], limits: m.Limits, server: str = "", decode_step_ms: float = 0.0) -> None:
        self.session_id = session_id
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos = frozenset(eos)
        self.limits = limits
        self.server = server
        self.decode_step_ms = decode_step_ms  # stated in the welcome (0: not stated)
        self.state = ServerState.AWAIT_HELLO
        self.request: _Request | None = None
        self.history: list[int] = []  # committed tokens of the last request, for prefix reuse
        self._finished_requests: set[int] = set()
        self._pending: m.Draft | None = None
        self._rate = RateLimiter(limits.max_messages_per_second)

    # -- inbound ------------------------------------------------------------------------------
    def receive(self, frame: bytes | str, now: float | None = None) -> list[ServerAction]:
        """Consume one frame; return what the driver must do, in order."""
        if self.state is ServerState.CLOSED:
            return []
        if self._pending is not None:
            raise RuntimeError("ServerSession.receive called before verdict() for the pending draft")
        if not self._rate.allow(time.monotonic() if now is None else now):
            return self._fail(ErrorCode.RATE_LIMITED, "too many messages; slow down", fatal=True)
        try:
            msg = m.decode_client(frame, self.limits.max_frame_bytes)
            return self._dispatch(msg)
        except ProtocolError as exc:
            rule = ERROR_RULES[exc.code]
            fatal = exc.fatal or rule.is_fatal(handshake_done=self.state is not ServerState.AWAIT_HELLO)
            if rule.ends_request and self.request is not None and exc.request_id == self.request.start.request:
                self._end_request(cancelled=False)
            return self._fail(exc.code, exc.message, request=exc.request_id, fatal=fatal)

    def _dispatch(self, msg: m.ClientMessage) -> list[ServerAction]:
        if self.state is ServerState.AWAIT_HELLO:
            if not isinstance(msg, m.Hello):
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "the first message must be 'hello'")
            return self._hello(msg)
        if isinstance(msg, m.Hello):
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "'hello' was already received")
        if isinstance(msg, m.Start):
            return self._start(msg)
        if isinstance(msg, m.Draft):
            return self._draft(msg)
        if isinstance(msg, m.Stream):
            return self._stream(msg)
        return self._cancel(msg)

    def _hello(self, hello: m.Hello) -> list[ServerAction]:
        if hello.protocol != m.PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                                f"protocol {hello.protocol} is not supported; this server speaks "
                                f"{m.PROTOCOL_VERSION}", fatal=True)
        if hello.tokenizer != self.tokenizer:
            raise ProtocolError(ErrorCode.TOKENIZER_MISMATCH,
                                f"the draft model's tokenizer ({hello.tokenizer[:16]}…) differs from the "
                                f"target {self.model}'s ({self.tokenizer[:16]}…); use a draft model from the "
                                "same family", fatal=True)
        self._move(ServerTrigger.HELLO)
        welcome = m.Welcome(protocol=m.PROTOCOL_VERSION, session=self.session_id, model=self.model,
                            tokenizer=self.tokenizer, vocab_size=self.vocab_size,
                            eos=sorted(self.eos), limits=self.limits, server=self.server,
                            decode_step_ms=round(self.decode_step_ms, 3))
        return [Send.of(welcome)]

    def _start(self, start: m.Start) -> list[ServerAction]:
        if self.request is not None:
            raise ProtocolError(ErrorCode.REQUEST_ACTIVE,
                                f"request {self.request.start.request} is still running; cancel it first",
                                request_id=start.request)
        if start.request in self._finished_requests:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"request id {start.request} was already used",
                                request_id=start.request)
        lim = self.limits
        if not start.prompt:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "the prompt is empty", request_id=start.request)
        if len(start.prompt) > lim.max_input_tokens:
            raise ProtocolError(ErrorCode.PROMPT_TOO_LONG,
                                f"prompt of {len(start.prompt)} tokens exceeds max_input_tokens "
                                f"{lim.max_input_tokens}", request_id=start.request)
        if len(start.prompt) >= lim.max_total_tokens:
            raise ProtocolError(ErrorCode.CONTEXT_FULL,
                                f"prompt of {len(start.prompt)} tokens leaves no room under "
                                f"max_total_tokens {lim.max_total_tokens}", request_id=start.request)
        bad = [t for t in (*start.prompt, *start.stop) if t >= self.vocab_size]
        if bad:
            raise ProtocolError(ErrorCode.BAD_TOKEN,
                                f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                                request_id=start.request)
        tokens = list(start.prompt)
        reusable = common_prefix(self.history, tokens)
        self.request = _Request(start=start, tokens=tokens, prompt_len=len(tokens))
        self._move(ServerTrigger.START_SPECULATIVE if start.mode == "speculative" else ServerTrigger.START_CLOUD)
        return [StartRequested(start=start, tokens=list(tokens), reusable=reusable)]

    def _draft(self, draft: m.Draft) -> list[ServerAction]:
        req = self.request
        if req is None or req.start.request != draft.request:
            if draft.request in self._finished_requests:
                return [Send.of(m.Discarded(request=draft.request, round=draft.round,
                                                  position=draft.position))]
            raise ProtocolError(ErrorCode.UNKNOWN_REQUEST, f"no active request {draft.request}",
                                request_id=draft.request)
        if self.state is not ServerState.SPECULATING:
            # Only this frame is refused; the stream goes on, so the error names no request.
            raise ProtocolError(ErrorCode.WRONG_MODE, "drafts are not accepted in cloud mode"
                                if self.state is ServerState.STREAMING else
                                "drafts are not accepted while a stream runs; send them after its last token")
        if draft.round <= req.last_round:
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                f"round {draft.round} after round {req.last_round}: rounds must increase",
                                request_id=draft.request)
        req.last_round = draft.round
        gamma = len(draft.tokens)
        if gamma < 1 or gamma > self.limits.max_draft:
            raise ProtocolError(ErrorCode.DRAFT_TOO_LONG,
                                f"{gamma} drafts; allowed 1..{self.limits.max_draft}", request_id=draft.request)
        if draft.position != len(req.tokens) or draft.parent != req.tokens[-1]:
            return [Send.of(m.Discarded(request=draft.request, round=draft.round,
                                              position=draft.position))]
        if draft.position + gamma > self.limits.max_total_tokens:
            raise ProtocolError(ErrorCode.CONTEXT_FULL,
                                f"drafts reach position {draft.position + gamma}, beyond max_total_tokens "
                                f"{self.limits.max_total_tokens}", request_id=draft.request)
        if any(t >= self.vocab_size for t in draft.tokens):
            raise ProtocolError(ErrorCode.BAD_TOKEN, f"draft token outside the vocabulary [0, {self.vocab_size})",
                                request_id=draft.request)
        greedy = req.start.sampling.temperature == 0.0
        if greedy and (draft.support or draft.q_ids or draft.q_probs):
            raise ProtocolError(ErrorCode.BAD_PROPOSAL,
                                "a greedy request (temperature 0) takes no proposal: send support 0 and empty "
                                "q_ids/q_probs", request_id=draft.request)
        if not greedy:
            self._check_proposal_size(draft)
        self._pending = draft
        return [DraftReceived(draft=draft, greedy=greedy)]

    def _check_proposal_size(self, draft: m.Draft) -> None:
        gamma, k = len(draft.tokens), draft.support
        if not 1 <= k <= self.limits.max_support:
            raise ProtocolError(ErrorCode.BAD_PROPOSAL,
                                f"support {k}; sampled requests need 1..{self.limits.max_support}",
                                request_id=draft.request)
        size = proposal_bytes(gamma, k)
        if len(draft.q_ids) != size or len(draft.q_probs) != size:
            raise ProtocolError(ErrorCode.BAD_PROPOSAL,
                                f"q_ids/q_probs must each be {size} bytes for {gamma}×{k}",
                                request_id=draft.request)

    def _stream(self, stream: m.Stream) -> list[ServerAction]:
        req = self.request
        if req is None or req.start.request != stream.request:
            if stream.request in self._finished_requests:
                return []  # it ended (e.g. at a stop token in the round before): nothing left to stream
            raise ProtocolError(ErrorCode.UNKNOWN_REQUEST, f"no active request {stream.request}",
                                request_id=stream.request)
        if self.state is ServerState.STREAMING:
            raise ProtocolError(ErrorCode.WRONG_MODE, "a cloud-mode request streams already")
        most = self.limits.max_stream_tokens
        if stream.tokens > most:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"stream of {stream.tokens} tokens; this verifier streams "
                                f"1..{most} per message" if most else "this verifier does not take 'stream'")
        starting = self.state is ServerState.SPECULATING
        req.chunk += stream.tokens
        self._move(ServerTrigger.STREAM)
        return [StreamRequested(stream.request)] if starting else []

    def _cancel(self, cancel: m.Cancel) -> list[ServerAction]:
        req = self.request
        if req is None or req.start.request != cancel.request:
            if cancel.request in self._finished_requests:
                return []  # finished before the cancel arrived: the final verdict already said so
            raise ProtocolError(ErrorCode.UNKNOWN_REQUEST, f"no active request {cancel.request}",
                                request_id=cancel.request)
        if self.state in STREAMING_STATES:
            req.cancel = True  # the generation loop stops at its next step and calls finish_cancel()
            return [CancelRequested(cancel.request)]
        return self._end_request(cancelled=True)

    # -- outbound -----------------------------------------------------------------------------
    @property
    def cancel_requested(self) -> bool:
        return self.request is not None and self.request.cancel

    @property
    def committed(self) -> list[int]:
        """The committed sequence of the active request (or of the last one)."""
        return list(self.request.tokens) if self.request is not None else list(self.history)

    def started(self, cached_tokens: int) -> list[ServerAction]:
        req = self._active()
        return [Send.of(m.Started(request=req.start.request, prompt_tokens=req.prompt_len,
                                        cached_tokens=cached_tokens))]

    def verdict(self, result: VerifiedRound, *, queue_ms: float = 0.0, forward_ms: float = 0.0,
                verified: int | None = None, suggested_gamma: int = 0,
                decode_step_ms: float = 0.0) -> list[ServerAction]:
        """Commit a verified round, applying the stop rules, and build the ``verdict``.

        ``verified``: how many of the drafts were judged (a prefix; default all of them);
        ``suggested_gamma``: the γ worth drafting next under the verifier's load (0: no suggestion);
        ``decode_step_ms``: the verifier's decode step for this session now (0: not stated).
        """
        draft, self._pending = self._pending, None
        req = self._active()
        if draft is None:
            raise RuntimeError("verdict() without a pending draft")
        verified = len(draft.tokens) if verified is None else verified
        if not result.accepted <= verified <= len(draft.tokens):
            raise RuntimeError(f"a verdict accepting {result.accepted} of {verified} verified drafts "
                               f"(of {len(draft.tokens)} sent)")
        emitted = [*draft.tokens[: result.accepted], result.token]
        reason = None
        kept = 0
        for token in emitted:
            req.tokens.append(token)
            kept += 1
            reason = _finish_reason(req, token, self.eos, self.limits.max_total_tokens)
            if reason:
                break
        verdict = m.Verdict(request=draft.request, round=draft.round, position=draft.position,
                            accepted=kept - 1, token=emitted[kept - 1], finished=reason is not None,
                            reason=reason, queue_ms=queue_ms, forward_ms=forward_ms, verified=verified,
                            suggested_gamma=suggested_gamma, decode_step_ms=round(decode_step_ms, 3))
        actions: list[ServerAction] = [Send.of(verdict)]
        if reason:
            self._end_request(cancelled=False)
        return actions

    @property
    def streaming(self) -> bool:
        """Whether the generation loop should take its next step (cloud mode, or a stream asked for)."""
        return self.state in STREAMING_STATES and not self.cancel_requested

    def stream(self, tokens: list[int], *, forward_ms: float = 0.0,
               probs: list[float] | None = None) -> tuple[list[ServerAction], bool]:
        """Commit tokens the target sampled alone; returns the actions and whether the request ended.
        ``probs``: each token's probability as it was sampled, sent with the tokens of a ``stream`` within
        a speculative request (the client measures its draft's acceptance on them), not in cloud mode.

        In ``STREAMING_CHUNK`` the session returns to ``SPECULATING`` once every token asked for is sent
        (``streaming`` is then false: the generation loop stops). A driver that hands more tokens than the
        chunk still owes has only the owed ones committed and sent — the client asked for that many — and
        drops the rest as a rejected draft is dropped (the next round's position says where to go on).
        """
        req = self._active()
        position = len(req.tokens)
        if self.state is ServerState.STREAMING_CHUNK:
            tokens = tokens[: max(0, req.chunk)]
        kept: list[int] = []
        reason = None
        for token in tokens:
            req.tokens.append(token)
            kept.append(token)
            reason = _finish_reason(req, token, self.eos, self.limits.max_total_tokens)
            if reason:
                break
        sent_probs = list(probs[: len(kept)]) if probs is not None and self.state is ServerState.STREAMING_CHUNK else []
        msg = m.Tokens(request=req.start.request, position=position, tokens=kept,
                       finished=reason is not None, reason=reason, forward_ms=forward_ms, probs=sent_probs)
        if reason:
            self._end_request(cancelled=False)
        elif self.state is ServerState.STREAMING_CHUNK:
            req.chunk -= len(kept)
            if req.chunk <= 0:
                req.chunk = 0  # exact for the next ``stream``, whatever the driver handed
                self._move(ServerTrigger.CHUNK_STREAMED)
        return [Send.of(msg)], reason is not None

    def finish_cancel(self) -> list[ServerAction]:
        """End a cancelled streaming request once its generation loop has stopped."""
        return self._end_request(cancelled=True)

    def error(self, code: ErrorCode, message: str, *, request: int | None = None,
              fatal: bool = False) -> list[ServerAction]:
        """An error found by the driver (a bad proposal, the model failed, shutdown, idleness): see
        ``ERROR_RULES`` for whether it ends the active request."""
        if ERROR_RULES[code].ends_request and self.request is not None \
                and (request is None or request == self.request.start.request):
            self._pending = None
            self._end_request(cancelled=False)
        return self._fail(code, message, request=request, fatal=fatal)

    def close(self) -> None:
        self._move(ServerTrigger.CLOSE)

    # -- internals ----------------------------------------------------------------------------
    def _move(self, event: ServerTrigger) -> None:
        self.state = server_transition(self.state, event)

    def _active(self) -> _Request:
        if self.request is None:
            raise RuntimeError("no active request")
        return self.request

    def _end_request(self, *, cancelled: bool) -> list[ServerAction]:
        req = self._active()
        self.history = req.tokens
        self._finished_requests.add(req.start.request)
        self.request = None
        self._move(ServerTrigger.END)
        if cancelled:
            return [Send.of(m.Cancelled(request=req.start.request, position=len(req.tokens)))]
        return []

    def _fail(self, code: ErrorCode, message: str, *, request: int | None = None,
              fatal: bool = False) -> list[ServerAction]:
        actions: list[ServerAction] = [
            Send.of(m.Error(code=code.value, message=message, request=request, fatal=fatal))
        ]
        if fatal:
            self._move(ServerTrigger.FATAL)
            actions.append(Close(int(ERROR_RULES[code].close), code.value))
        return actions
