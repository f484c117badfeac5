"""The edge's half of the session, sans-I/O (in the spirit of h11).

:class:`ClientSession` numbers requests and rounds, keeps the committed sequence, and checks every
server frame against what it sent; it never touches a socket, a clock or a model. Proposals reach it
as bytes (:class:`~specd.shared.protocol.codec.WireProposal`). docs/protocol.md §8 is the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specd.shared import messages as m
from specd.shared.errors import ERROR_RULES, ErrorCode, ProtocolError, RemoteError
from specd.shared.protocol.codec import NO_PROPOSAL, WireProposal
from specd.shared.protocol.states import ClientState, ClientTrigger, InvalidTransition, client_transition


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
    def verified(self) -> int:
        """How many drafts the server judged: all of them unless its goodput budget verified a prefix
        (the rest were not judged, not rejected)."""
        return self.drafted if self.verdict.verified is None else self.verdict.verified

    @property
    def suggested_gamma(self) -> int:
        """The γ the server would verify of the next round under its load (0: no suggestion)."""
        return self.verdict.suggested_gamma

    @property
    def decode_step_ms(self) -> float:
        """The server's decode step for this session now, in ms (0: not stated)."""
        return self.verdict.decode_step_ms

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
    _stream_owed: int = 0  # tokens asked for with ``stream`` and not received yet

    @property
    def generated(self) -> list[int]:
        return self.committed[self.prompt_len:]

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def stream_owed(self) -> int:
        """Tokens asked for with :meth:`stream` that have not arrived yet."""
        return self._stream_owed

    @property
    def can_stream(self) -> bool:
        """Whether the server takes ``stream`` (it announces ``limits.max_stream_tokens`` > 0)."""
        return self.welcome is not None and self.welcome.limits.max_stream_tokens > 0

    def hello(self) -> bytes:
        if self.state is not ClientState.NEW:
            raise RuntimeError("hello() was already sent")
        self._move(ClientTrigger.HELLO)
        return m.encode(m.Hello(protocol=m.PROTOCOL_VERSION, tokenizer=self.tokenizer,
                                client=self.client, draft_model=self.draft_model))

    def start(self, prompt: list[int], *, max_new_tokens: int, sampling: m.Sampling | None = None,
              seed: int | None = None, stop: list[int] | None = None,
              mode: str = "speculative") -> bytes:
        if self.state is not ClientState.READY:
            raise RuntimeError(f"cannot start a request in state {self.state.value}")
        self._move(ClientTrigger.START)
        self.request = self._next_request
        self._next_request += 1
        self._next_round = 0
        self._in_flight.clear()
        self._stream_owed = 0
        self.mode = mode
        self.prompt_len = len(prompt)
        self.committed = list(prompt)
        self.finished, self.reason = False, None
        return m.encode(m.Start(request=self.request, prompt=list(prompt), max_new_tokens=max_new_tokens,
                                sampling=sampling or m.Sampling(), seed=seed, stop=list(stop or []), mode=mode))  # type: ignore[arg-type]

    def draft(self, tokens: list[int], proposal: WireProposal | None = None, *,
              assumed: list[int] | None = None) -> tuple[int, bytes]:
        """Frame a round of drafts and their proposal (None when greedy); returns ``(round, frame)``.

        ``assumed`` are tokens the client expects to be committed first (a round drafted ahead while
        the previous one is verified); the server discards the round if they are not.
        """
        if self.state is not ClientState.ACTIVE or self.mode != "speculative":
            raise RuntimeError("draft() needs an active speculative request")
        base = self.committed + list(assumed or [])
        support, q_ids, q_probs = proposal or NO_PROPOSAL
        rnd = self._next_round
        self._next_round += 1
        self._in_flight[rnd] = _Sent(position=len(base), parent=base[-1], tokens=list(tokens))
        return rnd, m.encode(m.Draft(request=self.request, round=rnd, position=len(base), parent=base[-1],
                                     tokens=list(tokens), support=support, q_ids=q_ids, q_probs=q_probs))

    def stream(self, tokens: int) -> bytes:
        """Ask the verifier to generate the next ``tokens`` alone (after the rounds already sent)."""
        if self.state is not ClientState.ACTIVE or self.mode != "speculative":
            raise RuntimeError("stream() needs an active speculative request")
        if not self.can_stream:
            raise RuntimeError("this verifier does not take 'stream' (limits.max_stream_tokens is 0)")
        self._stream_owed += tokens
        return m.encode(m.Stream(request=self.request, tokens=tokens))

    def cancel(self) -> bytes:
        return m.encode(m.Cancel(request=self.request))

    def receive(self, frame: bytes | str) -> list[ClientEvent]:
        """Consume one server frame. Raises :class:`ProtocolError` if the server breaks the protocol."""
        msg = m.decode_server(frame)
        if isinstance(msg, m.Error):
            error = RemoteError(msg.code, msg.message, fatal=msg.fatal, request_id=msg.request)
            if msg.fatal:
                self._move(ClientTrigger.FATAL)
            elif msg.request is not None and msg.request == self.request and self.state is ClientState.ACTIVE \
                    and _ends_request(msg.code):
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
            self._move(ClientTrigger.WELCOME)
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
            if self.state is not ClientState.ACTIVE:
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"tokens for request {msg.request}, which ended")
            if msg.position != len(self.committed):
                raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                    f"tokens for position {msg.position}, expected {len(self.committed)}")
            if self.mode == "speculative":
                if len(msg.tokens) > self._stream_owed:
                    raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE,
                                        f"{len(msg.tokens)} tokens streamed, {self._stream_owed} asked for")
                self._stream_owed -= len(msg.tokens)
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
        if v.verified is not None and not v.accepted <= v.verified <= len(sent.tokens):
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"verdict accepts {v.accepted} of {v.verified} verified drafts "
                                f"({len(sent.tokens)} sent)")
        new_tokens = [*sent.tokens[: v.accepted], v.token]
        self.committed.extend(new_tokens)
        if v.finished:
            self._end(v.reason)
        return RoundVerdict(verdict=v, drafted=len(sent.tokens), new_tokens=new_tokens)

    def _end(self, reason: str | None) -> None:
        try:
            self._move(ClientTrigger.END)
        except InvalidTransition as exc:  # e.g. a second end for one request
            raise ProtocolError(ErrorCode.UNEXPECTED_MESSAGE, str(exc)) from None
        self.finished, self.reason = True, reason
        self._in_flight.clear()
        self._stream_owed = 0

    def _move(self, event: ClientTrigger) -> None:
        self.state = client_transition(self.state, event)


def _ends_request(code: str) -> bool:
    """Whether an error with ``code`` naming the active request ends it (a code this client does not
    know is taken to end it: the safe reading)."""
    known = {c.value: c for c in ErrorCode}
    return code not in known or ERROR_RULES[known[code]].ends_request
