"""The speculative session as sans-I/O state machines (in the spirit of h11).

:class:`ServerSession` and :class:`ClientSession` consume frames and return actions and events; they
never touch a socket, a clock they were not given, or a model. ``daemon/`` and ``desktop/`` move the
bytes and run the models. docs/protocol.md describes the same machine in prose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from specd.shared import messages as m
from specd.shared.errors import ErrorCode, ProposalError, ProtocolError, RemoteError
from specd.shared.sampling import ProposalDistribution, RoundResult, validate_proposal

# WebSocket close codes the daemon uses for the actions below.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013


# --- actions for the driver -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` as one binary frame."""

    data: bytes


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
    """Verify this round in one forward over ``[parent] + drafts``, then call ``ServerSession.verdict``."""

    draft: m.Draft
    draft_ids: torch.Tensor
    proposal: ProposalDistribution | None
    greedy: bool


@dataclass(frozen=True, slots=True)
class CancelRequested:
    request: int


ServerAction = Send | Close | StartRequested | DraftReceived | CancelRequested


class ServerState(Enum):
    AWAIT_HELLO = "await_hello"
    READY = "ready"
    SPECULATING = "speculating"
    STREAMING = "streaming"
    CLOSED = "closed"


@dataclass(slots=True)
class _Request:
    start: m.Start
    tokens: list[int]  # committed sequence: prompt + generated
    prompt_len: int
    last_round: int = -1
    cancel: bool = False

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


def _finish_reason(req: _Request, token: int, eos: frozenset[int], max_total: int) -> str | None:
    """Why generation ends after ``token`` was appended to ``req.tokens``, or None."""
    if token in eos:
        return "eos"
    if token in req.start.stop:
        return "stop"
    if req.generated >= req.start.max_new_tokens:
        return "length"
    if len(req.tokens) >= max_total:
        return "context"
    return None


class RateLimiter:
    """Token bucket: ``rate`` messages per second, bursts up to ``burst`` (default twice the rate).

    The server refuses a message with :meth:`allow`; a client paces itself with :meth:`delay` so it
    never trips the limit the server advertised (``Limits.max_messages_per_second``).
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(2 * rate if burst is None else burst)
        self.allowance = self.burst
        self.last: float | None = None

    def _refill(self, now: float) -> None:
        if self.last is not None:
            self.allowance = min(self.burst, self.allowance + max(0.0, now - self.last) * self.rate)
        self.last = now

    def allow(self, now: float) -> bool:
        """Take one message's allowance; False (taking nothing) when there is none left."""
        if self.rate <= 0:
            return True
        self._refill(now)
        if self.allowance < 1.0:
            return False
        self.allowance -= 1.0
        return True

    def delay(self, now: float) -> float:
        """Reserve one message; the seconds to wait before sending it (0 when it may go now)."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        self.allowance -= 1.0
        return 0.0 if self.allowance >= 0.0 else -self.allowance / self.rate


class ServerSession:
    """The verifier's half of one connection."""

    def __init__(self, *, session_id: str, model: str, tokenizer: str, vocab_size: int,
                 eos: list[int], limits: m.Limits, server: str = "") -> None:
        self.session_id = session_id
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos = frozenset(eos)
        self.limits = limits
        self.server = server
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
            fatal = exc.fatal or self.state is ServerState.AWAIT_HELLO
            if self.request is not None and exc.request_id == self.request.start.request:
                self._end_request(cancelled=False)  # an error naming a request always ends it
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
        self.state = ServerState.READY
        welcome = m.Welcome(protocol=m.PROTOCOL_VERSION, session=self.session_id, model=self.model,
                            tokenizer=self.tokenizer, vocab_size=self.vocab_size,
                            eos=sorted(self.eos), limits=self.limits, server=self.server)
        return [Send(m.encode(welcome))]

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
        self.state = ServerState.SPECULATING if start.mode == "speculative" else ServerState.STREAMING
        return [StartRequested(start=start, tokens=list(tokens), reusable=reusable)]

    def _draft(self, draft: m.Draft) -> list[ServerAction]:
        req = self.request
        if req is None or req.start.request != draft.request:
            if draft.request in self._finished_requests:
                return [Send(m.encode(m.Discarded(request=draft.request, round=draft.round,
                                                  position=draft.position)))]
            raise ProtocolError(ErrorCode.UNKNOWN_REQUEST, f"no active request {draft.request}",
                                request_id=draft.request)
        if req.start.mode != "speculative":
            # Only this frame is refused; the stream goes on, so the error names no request.
            raise ProtocolError(ErrorCode.WRONG_MODE, "drafts are not accepted in cloud mode")
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
            return [Send(m.encode(m.Discarded(request=draft.request, round=draft.round,
                                              position=draft.position)))]
        if draft.position + gamma > self.limits.max_total_tokens:
            raise ProtocolError(ErrorCode.CONTEXT_FULL,
                                f"drafts reach position {draft.position + gamma}, beyond max_total_tokens "
                                f"{self.limits.max_total_tokens}", request_id=draft.request)
        if any(t >= self.vocab_size for t in draft.tokens):
            raise ProtocolError(ErrorCode.BAD_TOKEN, f"draft token outside the vocabulary [0, {self.vocab_size})",
                                request_id=draft.request)
        greedy = req.start.sampling.temperature == 0.0
        draft_ids = torch.tensor(draft.tokens, dtype=torch.int64)
        proposal = None if greedy else self._proposal(draft, draft_ids)
        self._pending = draft
        return [DraftReceived(draft=draft, draft_ids=draft_ids, proposal=proposal, greedy=greedy)]

    def _proposal(self, draft: m.Draft, draft_ids: torch.Tensor) -> ProposalDistribution:
        gamma, k = len(draft.tokens), draft.support
        if not 1 <= k <= self.limits.max_support:
            raise ProtocolError(ErrorCode.BAD_PROPOSAL,
                                f"support {k}; sampled requests need 1..{self.limits.max_support}",
                                request_id=draft.request)
        size = gamma * k * 4
        if len(draft.q_ids) != size or len(draft.q_probs) != size:
            raise ProtocolError(ErrorCode.BAD_PROPOSAL,
                                f"q_ids/q_probs must each be {size} bytes for {gamma}×{k}",
                                request_id=draft.request)
        proposal = decode_proposal(draft.q_ids, draft.q_probs, gamma, k)
        try:
            validate_proposal(draft_ids, proposal, self.vocab_size)
        except ProposalError as exc:
            raise ProtocolError(ErrorCode.BAD_PROPOSAL, str(exc), request_id=draft.request) from None
        return proposal

    def _cancel(self, cancel: m.Cancel) -> list[ServerAction]:
        req = self.request
        if req is None or req.start.request != cancel.request:
            if cancel.request in self._finished_requests:
                return []  # finished before the cancel arrived: the final verdict already said so
            raise ProtocolError(ErrorCode.UNKNOWN_REQUEST, f"no active request {cancel.request}",
                                request_id=cancel.request)
        if self.state is ServerState.STREAMING:
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
        return [Send(m.encode(m.Started(request=req.start.request, prompt_tokens=req.prompt_len,
                                        cached_tokens=cached_tokens)))]

    def verdict(self, result: RoundResult, *, queue_ms: float = 0.0,
                forward_ms: float = 0.0) -> list[ServerAction]:
        """Commit a verified round, applying the stop rules, and build the ``verdict``."""
        draft, self._pending = self._pending, None
        req = self._active()
        if draft is None:
            raise RuntimeError("verdict() without a pending draft")
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
                            reason=reason, queue_ms=queue_ms, forward_ms=forward_ms)
        actions: list[ServerAction] = [Send(m.encode(verdict))]
        if reason:
            self._end_request(cancelled=False)
        return actions

    def stream(self, tokens: list[int], *, forward_ms: float = 0.0) -> tuple[list[ServerAction], bool]:
        """Commit tokens sampled in cloud mode; returns the actions and whether the request ended."""
        req = self._active()
        position = len(req.tokens)
        kept: list[int] = []
        reason = None
        for token in tokens:
            req.tokens.append(token)
            kept.append(token)
            reason = _finish_reason(req, token, self.eos, self.limits.max_total_tokens)
            if reason:
                break
        msg = m.Tokens(request=req.start.request, position=position, tokens=kept,
                       finished=reason is not None, reason=reason, forward_ms=forward_ms)
        if reason:
            self._end_request(cancelled=False)
        return [Send(m.encode(msg))], reason is not None

    def finish_cancel(self) -> list[ServerAction]:
        """End a cancelled cloud-mode request once its generation loop has stopped."""
        return self._end_request(cancelled=True)

    def error(self, code: ErrorCode, message: str, *, request: int | None = None,
              fatal: bool = False) -> list[ServerAction]:
        """An error found by the driver (e.g. the model failed); ends the active request."""
        if self.request is not None and (request is None or request == self.request.start.request):
            self._pending = None
            self._end_request(cancelled=False)
        return self._fail(code, message, request=request, fatal=fatal)

    def close(self) -> None:
        self.state = ServerState.CLOSED

    # -- internals ----------------------------------------------------------------------------
    def _active(self) -> _Request:
        if self.request is None:
            raise RuntimeError("no active request")
        return self.request

    def _end_request(self, *, cancelled: bool) -> list[ServerAction]:
        req = self._active()
        self.history = req.tokens
        self._finished_requests.add(req.start.request)
        self.request = None
        self.state = ServerState.READY
        if cancelled:
            return [Send(m.encode(m.Cancelled(request=req.start.request, position=len(req.tokens))))]
        return []

    def _fail(self, code: ErrorCode, message: str, *, request: int | None = None,
              fatal: bool = False) -> list[ServerAction]:
        actions: list[ServerAction] = [
            Send(m.encode(m.Error(code=code.value, message=message, request=request, fatal=fatal)))
        ]
        if fatal:
            self.state = ServerState.CLOSED
            close_code = CLOSE_POLICY_VIOLATION if code in _POLICY_CODES else CLOSE_PROTOCOL_ERROR
            actions.append(Close(close_code, code.value))
        return actions


_POLICY_CODES = {ErrorCode.RATE_LIMITED, ErrorCode.TOKENIZER_MISMATCH, ErrorCode.UNSUPPORTED_VERSION}


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def encode_proposal(proposal: ProposalDistribution) -> tuple[int, bytes, bytes]:
    """``(support, q_ids, q_probs)`` for a ``draft`` message: int32 and float32, little-endian."""
    ids = proposal.ids.to(torch.int32).contiguous().cpu().numpy().astype("<i4", copy=False)
    probs = proposal.probs.to(torch.float32).contiguous().cpu().numpy().astype("<f4", copy=False)
    return proposal.support_size, ids.tobytes(), probs.tobytes()


def decode_proposal(q_ids: bytes, q_probs: bytes, gamma: int, support: int) -> ProposalDistribution:
    ids = torch.frombuffer(bytearray(q_ids), dtype=torch.int32).reshape(gamma, support)
    probs = torch.frombuffer(bytearray(q_probs), dtype=torch.float32).reshape(gamma, support)
    return ProposalDistribution(ids=ids.to(torch.int64), probs=probs.clone())


# --- client side ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Welcomed:
    welcome: m.Welcome


@dataclass(frozen=True, slots=True)
class RequestStarted:
    started: m.Started


@dataclass(frozen=True, slots=True)
class RoundVerdict:
    """A verified round: ``new_tokens`` were committed (accepted drafts + one target token)."""

    verdict: m.Verdict
    drafted: int
    new_tokens: list[int]

    @property
    def accepted(self) -> int:
        return self.verdict.accepted

    @property
    def finished(self) -> bool:
        return self.verdict.finished


@dataclass(frozen=True, slots=True)
class RoundDiscarded:
    discarded: m.Discarded


@dataclass(frozen=True, slots=True)
class TokensStreamed:
    tokens: m.Tokens


@dataclass(frozen=True, slots=True)
class RequestCancelled:
    cancelled: m.Cancelled


@dataclass(frozen=True, slots=True)
class ServerFailed:
    error: RemoteError


ClientEvent = (Welcomed | RequestStarted | RoundVerdict | RoundDiscarded | TokensStreamed | RequestCancelled
               | ServerFailed)


class ClientState(Enum):
    NEW = "new"
    HELLO_SENT = "hello_sent"
    READY = "ready"
    ACTIVE = "active"
    CLOSED = "closed"


@dataclass(slots=True)
class _Sent:
    position: int
    parent: int
    tokens: list[int]


@dataclass(slots=True)
class ClientSession:
    """The edge's half: numbers requests and rounds, tracks the committed sequence and rollbacks."""

    tokenizer: str
    client: str = "specd"
    draft_model: str = ""
    state: ClientState = ClientState.NEW
    welcome: m.Welcome | None = None
    request: int = -1
    mode: str = "speculative"
    prompt_len: int = 0
    committed: list[int] = field(default_factory=list)
    finished: bool = False
    reason: str | None = None
    _next_request: int = 0
    _next_round: int = 0
    _in_flight: dict[int, _Sent] = field(default_factory=dict)

    @property
    def generated(self) -> list[int]:
        return self.committed[self.prompt_len:]

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def hello(self) -> bytes:
        if self.state is not ClientState.NEW:
            raise RuntimeError("hello() was already sent")
        self.state = ClientState.HELLO_SENT
        return m.encode(m.Hello(protocol=m.PROTOCOL_VERSION, tokenizer=self.tokenizer,
                                client=self.client, draft_model=self.draft_model))

    def start(self, prompt: list[int], *, max_new_tokens: int, sampling: m.Sampling | None = None,
              seed: int | None = None, stop: list[int] | None = None,
              mode: str = "speculative") -> bytes:
        if self.state is not ClientState.READY:
            raise RuntimeError(f"cannot start a request in state {self.state.value}")
        self.request = self._next_request
        self._next_request += 1
        self._next_round = 0
        self._in_flight.clear()
        self.mode = mode
        self.prompt_len = len(prompt)
        self.committed = list(prompt)
        self.finished, self.reason = False, None
        self.state = ClientState.ACTIVE
        return m.encode(m.Start(request=self.request, prompt=list(prompt), max_new_tokens=max_new_tokens,
                                sampling=sampling or m.Sampling(), seed=seed, stop=list(stop or []), mode=mode))  # type: ignore[arg-type]

    def draft(self, tokens: list[int], proposal: ProposalDistribution | None = None, *,
              assumed: list[int] | None = None) -> tuple[int, bytes]:
        """Frame a round of drafts; returns ``(round, frame)``.

        ``assumed`` are tokens the client expects to be committed first (a round drafted ahead while
        the previous one is verified); the server discards the round if they are not.
        """
        if self.state is not ClientState.ACTIVE or self.mode != "speculative":
            raise RuntimeError("draft() needs an active speculative request")
        base = self.committed + list(assumed or [])
        support, q_ids, q_probs = encode_proposal(proposal) if proposal is not None else (0, b"", b"")
        rnd = self._next_round
        self._next_round += 1
        self._in_flight[rnd] = _Sent(position=len(base), parent=base[-1], tokens=list(tokens))
        return rnd, m.encode(m.Draft(request=self.request, round=rnd, position=len(base), parent=base[-1],
                                     tokens=list(tokens), support=support, q_ids=q_ids, q_probs=q_probs))

    def cancel(self) -> bytes:
        return m.encode(m.Cancel(request=self.request))

    def receive(self, frame: bytes | str) -> list[ClientEvent]:
        """Consume one server frame. Raises :class:`ProtocolError` if the server breaks the protocol."""
        msg = m.decode_server(frame)
        if isinstance(msg, m.Error):
            error = RemoteError(msg.code, msg.message, fatal=msg.fatal, request_id=msg.request)
            if msg.fatal:
                self.state = ClientState.CLOSED
            elif msg.request is not None and msg.request == self.request and self.state is ClientState.ACTIVE:
                self._end(None)
            return [ServerFailed(error)]
        if isinstance(msg, m.Welcome):
            if self.state is not ClientState.HELLO_SENT:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "unexpected 'welcome'")
            if msg.tokenizer != self.tokenizer:
                raise ProtocolError(ErrorCode.TOKENIZER_MISMATCH,
                                    f"the server's target model {msg.model} uses a different tokenizer "
                                    "than the draft model; choose a draft from the same family")
            self.welcome = msg
            self.state = ClientState.READY
            return [Welcomed(msg)]
        if getattr(msg, "request", None) != self.request:
            return []  # about a request this client already gave up on
        if isinstance(msg, m.Started):
            return [RequestStarted(msg)]
        if isinstance(msg, m.Verdict):
            return [self._verdict(msg)]
        if isinstance(msg, m.Discarded):
            self._in_flight.pop(msg.round, None)
            return [RoundDiscarded(msg)]
        if isinstance(msg, m.Tokens):
            if msg.position != len(self.committed):
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                    f"tokens for position {msg.position}, expected {len(self.committed)}")
            self.committed.extend(msg.tokens)
            if msg.finished:
                self._end(msg.reason)
            return [TokensStreamed(msg)]
        assert isinstance(msg, m.Cancelled)
        self._end("cancelled")
        return [RequestCancelled(msg)]

    def _verdict(self, v: m.Verdict) -> RoundVerdict:
        sent = self._in_flight.pop(v.round, None)
        if sent is None or v.position != sent.position or v.position != len(self.committed):
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                f"verdict for round {v.round} at position {v.position} does not match "
                                f"what was sent (committed length {len(self.committed)})")
        if v.accepted > len(sent.tokens):
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"verdict accepts {v.accepted} of {len(sent.tokens)} drafts")
        new_tokens = [*sent.tokens[: v.accepted], v.token]
        self.committed.extend(new_tokens)
        if v.finished:
            self._end(v.reason)
        return RoundVerdict(verdict=v, drafted=len(sent.tokens), new_tokens=new_tokens)

    def _end(self, reason: str | None) -> None:
        self.finished, self.reason = True, reason
        self._in_flight.clear()
        self.state = ClientState.READY
