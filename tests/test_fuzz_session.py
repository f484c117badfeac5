"""Fuzzing the sans-I/O sessions: random, mutated and out-of-order traffic never breaks them.

A simulated driver plays the daemon (prefill, verdicts, cloud steps) around a real ServerSession while
hypothesis picks each next frame: an honest one built from the session's state, an honest one with one
field broken (reused round, shifted position, wrong parent, out-of-vocabulary id, γ out of range, NaN or
unnormalised proposal), a byte- or field-mutated one, or garbage. Example counts are small for CI;
``SPECD_FUZZ_EXAMPLES=5000`` runs thousands (tests/fuzz_strategies.py).
"""

from __future__ import annotations

import math

import msgspec
import torch
from hypothesis import given
from hypothesis import strategies as st

from specd.daemon.rounds import decode_round
from specd.shared import messages as m
from specd.shared import protocol as s
from specd.shared.errors import ErrorCode, ProposalError, ProtocolError
from specd.shared.sampling import RoundResult, decode_proposal
from tests import fuzz_strategies as fz

VOCAB = fz.VOCAB
LIMITS = m.Limits(max_input_tokens=24, max_total_tokens=40, max_draft=5, max_support=8, max_frame_bytes=4096,
                  max_messages_per_second=0, max_stream_tokens=6)
CODES = {c.value for c in ErrorCode}


def _server() -> s.ServerSession:
    return s.ServerSession(session_id="fuzz", model="tiny", tokenizer="fp", vocab_size=VOCAB, eos=[2],
                           limits=LIMITS)


class FuzzDriver:
    """Plays the daemon around a ServerSession and checks every action it gets back."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.server = _server()
        self.closed = False
        self.next_request = 0
        self.next_round = 0
        self.verdicts = 0

    # -- frames --------------------------------------------------------------------------------
    def honest(self) -> m.ClientMessage:
        srv, draw = self.server, self.data.draw
        if srv.state is s.ServerState.AWAIT_HELLO:
            return m.Hello(protocol=m.PROTOCOL_VERSION, tokenizer="fp")
        req = srv.request
        if req is None or draw(st.integers(0, 9)) == 0:
            if req is None or draw(st.booleans()):
                self.next_request += 1
                self.next_round = 0
                prompt = draw(st.lists(fz.token, min_size=1, max_size=LIMITS.max_input_tokens))
                return m.Start(request=self.next_request, prompt=prompt, max_new_tokens=draw(st.integers(1, 30)),
                               sampling=draw(fz.sampling), seed=draw(st.none() | fz.small),
                               stop=draw(st.lists(fz.token, max_size=2)),
                               mode=draw(st.sampled_from(["speculative", "speculative", "cloud"])))
            return m.Cancel(request=req.start.request)
        if draw(st.integers(0, 5)) == 0:  # hand a stretch to the target (wrong_mode in cloud mode)
            return m.Stream(request=req.start.request, tokens=draw(st.integers(1, 8)))
        tokens = draw(st.lists(fz.token, min_size=1, max_size=LIMITS.max_draft))
        room = LIMITS.max_total_tokens - len(req.tokens)
        if draw(st.integers(0, 4)):  # sometimes honest but beyond the context: context_full
            tokens = tokens[: max(1, room)]
        sampled = req.start.sampling.temperature > 0
        support, q_ids, q_probs = draw(fz.proposals(tokens)) if sampled else (0, b"", b"")
        self.next_round += draw(st.integers(1, 3))
        return m.Draft(request=req.start.request, round=self.next_round, position=len(req.tokens),
                       parent=req.tokens[-1], tokens=tokens, support=support, q_ids=q_ids, q_probs=q_probs)

    def broken(self, msg: m.ClientMessage) -> dict:
        """``msg`` as a map with one field made wrong in a way the protocol names."""
        raw = msgspec.msgpack.decode(m.encode(msg))
        draw = self.data.draw
        if raw["type"] == "draft":
            fault = draw(st.sampled_from(["round", "position", "parent", "oov", "gamma0", "gamma_big", "nan",
                                          "inf", "negative", "unnormalised", "support", "short_bytes", "dup_ids",
                                          "draft_outside_support", "beyond_context", "request"]))
            gamma = len(raw["tokens"])
            if fault == "round":
                raw["round"] = max(0, self.next_round - draw(st.integers(0, 3)))
            elif fault == "position":
                raw["position"] += draw(st.sampled_from([-2, -1, 1, 2, 10**6]))
                raw["position"] = max(0, raw["position"])
            elif fault == "parent":
                raw["parent"] = draw(fz.token | st.integers(VOCAB, 2**31 - 1))
            elif fault == "oov":
                raw["tokens"][draw(st.integers(0, gamma - 1))] = draw(st.integers(VOCAB, 2**31 - 1))
            elif fault == "gamma0":
                raw["tokens"] = []
            elif fault == "gamma_big":
                raw["tokens"] = draw(st.lists(fz.token, min_size=LIMITS.max_draft + 1, max_size=200))
            elif fault == "beyond_context":
                raw["position"] = LIMITS.max_total_tokens - 1
            elif fault == "request":
                raw["request"] = draw(fz.small)
            elif fault == "support":
                raw["support"] = draw(st.sampled_from([0, LIMITS.max_support + 1, 2**32]))
            else:
                k = max(1, raw["support"])
                ids = [t for t in raw["tokens"] for _ in range(k)]
                probs = [1.0 / k] * (gamma * k)
                if fault in ("nan", "inf", "negative"):
                    probs[draw(st.integers(0, len(probs) - 1))] = {"nan": math.nan, "inf": math.inf,
                                                                   "negative": -0.5}[fault]
                elif fault == "unnormalised":
                    probs = [p * draw(st.sampled_from([0.5, 1.01, 3.0, 0.0])) for p in probs]
                elif fault == "short_bytes":
                    probs = probs[:-1]
                elif fault == "draft_outside_support":
                    ids = [(t + 1) % VOCAB for t in ids]
                if fault != "dup_ids":
                    ids = [ids[i] if i % k == 0 else (ids[i] + i) % VOCAB for i in range(len(ids))]
                raw.update(support=k, q_ids=fz.i32_bytes(ids), q_probs=fz.f32_bytes(probs))
        elif raw["type"] == "start":
            fault = draw(st.sampled_from(["empty", "long", "oov", "stop_oov", "reuse", "max_new"]))
            if fault == "empty":
                raw["prompt"] = []
            elif fault == "long":
                raw["prompt"] = [1] * draw(st.integers(LIMITS.max_input_tokens + 1, 200))
            elif fault == "oov":
                raw["prompt"][-1] = draw(st.integers(VOCAB, 2**31 - 1))
            elif fault == "stop_oov":
                raw["stop"] = [VOCAB]
            elif fault == "reuse":
                raw["request"] = max(0, self.next_request - 1)
            else:
                raw["max_new_tokens"] = draw(st.sampled_from([0, -1, 2**64 - 1]))
        else:
            raw["request" if "request" in raw else "protocol"] = draw(fz.nasty_ints)
        return raw

    def next_frame(self) -> bytes | str:
        kind = self.data.draw(st.sampled_from(["honest"] * 6 + ["broken"] * 3 + ["mutated", "garbage"]))
        if kind == "garbage":
            return self.data.draw(fz.frames_from(fz.client_messages))
        msg = self.honest()
        if kind == "honest":
            return m.encode(msg)
        if kind == "broken":
            return msgspec.msgpack.encode(self.broken(msg))
        return self.data.draw(fz.byte_mutations(m.encode(msg)) | fz.field_mutations(m.encode(msg)))

    # -- driving and checking ------------------------------------------------------------------
    def feed(self, frame: bytes | str) -> None:
        actions = self.server.receive(frame, now=0.0)
        if self.closed:
            assert actions == [], "a closed session ignores everything"
            return
        self.handle(actions)

    def handle(self, actions: list[s.ServerAction]) -> None:
        for i, action in enumerate(actions):
            assert not self.closed, "nothing follows a Close"
            if isinstance(action, s.Send):
                self.check_sent(action.data)
            elif isinstance(action, s.Close):
                assert i == len(actions) - 1 and self.server.state is s.ServerState.CLOSED
                self.closed = True
            elif isinstance(action, s.StartRequested):
                assert action.tokens == list(action.start.prompt) and 0 <= action.reusable <= len(action.tokens)
                self.handle(self.server.started(cached_tokens=action.reusable))
                if self.server.state is s.ServerState.STREAMING:
                    self.stream_some()
            elif isinstance(action, s.StreamRequested):
                assert self.server.state is s.ServerState.STREAMING_CHUNK and self.server.request.chunk > 0
                self.stream_some()
            elif isinstance(action, s.DraftReceived):
                if not self.check_draft(action):
                    self.handle(self.server.error(ErrorCode.BAD_PROPOSAL, "refused", request=action.draft.request))
                    continue
                accepted = self.data.draw(st.integers(0, len(action.draft.tokens)))
                self.handle(self.server.verdict(RoundResult(accepted=accepted, token=self.data.draw(fz.token))))
            elif isinstance(action, s.CancelRequested):
                assert self.server.cancel_requested
                self.handle(self.server.finish_cancel())
            else:
                raise AssertionError(f"unknown action {action!r}")
        self.check_state()

    def stream_some(self) -> None:
        for _ in range(self.data.draw(st.integers(0, 3))):
            if not self.server.streaming:
                return
            actions, _ = self.server.stream(self.data.draw(st.lists(fz.token, min_size=1, max_size=3)))
            self.handle(actions)

    def check_sent(self, data: bytes) -> None:
        msg = m.decode_server(data)  # the server only ever sends valid messages
        if isinstance(msg, m.Error):
            assert msg.code in CODES and msg.message
            if msg.fatal:
                assert self.server.state is s.ServerState.CLOSED
        elif isinstance(msg, m.Verdict):
            self.verdicts += 1
            assert msg.position + msg.accepted + 1 <= LIMITS.max_total_tokens

    def check_draft(self, action: s.DraftReceived) -> bool:
        """Check what the session let through and decode it as the daemon does; False: the verifier refuses it."""
        draft, req = action.draft, self.server.request
        assert req is not None and req.start.mode == "speculative" and draft.request == req.start.request
        assert 1 <= len(draft.tokens) <= LIMITS.max_draft
        assert draft.position == len(req.tokens) and draft.parent == req.tokens[-1]
        assert draft.position + len(draft.tokens) <= LIMITS.max_total_tokens
        try:
            drafts = decode_round(draft, action.greedy, VOCAB)
        except ProposalError:
            assert not action.greedy
            return False
        assert bool((drafts.draft_ids < VOCAB).all()) and bool((drafts.draft_ids >= 0).all())
        if action.greedy:
            assert drafts.q is None
        else:
            q = decode_proposal(draft.q_ids, draft.q_probs, len(draft.tokens), draft.support)
            assert q is not None and 1 <= q.support_size <= LIMITS.max_support
            assert bool(torch.isfinite(q.probs).all()) and bool((q.probs >= 0).all())
            assert bool(((q.ids >= 0) & (q.ids < VOCAB)).all())
            assert bool(((q.probs.double().sum(-1) - 1).abs() <= 1e-3).all())
        return True

    def check_state(self) -> None:
        srv = self.server
        if srv.state in (s.ServerState.SPECULATING, s.ServerState.STREAMING, s.ServerState.STREAMING_CHUNK):
            assert srv.request is not None
            assert len(srv.request.tokens) <= LIMITS.max_total_tokens
            assert all(0 <= t < VOCAB for t in srv.request.tokens)
        elif srv.state is s.ServerState.READY:
            assert srv.request is None


@fz.fuzz_settings(150)
@given(st.data())
def test_server_session_turns_any_traffic_into_actions_or_typed_errors(data):
    driver = FuzzDriver(data)
    for _ in range(data.draw(st.integers(1, 40))):
        driver.feed(driver.next_frame())


@fz.fuzz_settings(100)
@given(st.data())
def test_honest_traffic_with_broken_fields_keeps_the_session_usable(data):
    """Non-fatal errors after the handshake leave the connection usable: an honest round still works."""
    driver = FuzzDriver(data)
    driver.feed(m.encode(m.Hello(protocol=1, tokenizer="fp")))
    for _ in range(data.draw(st.integers(1, 15))):
        msg = driver.honest()
        if isinstance(msg, m.Hello):
            break
        driver.feed(msgspec.msgpack.encode(driver.broken(msg)))
        if driver.closed:
            return
    if driver.server.request is not None:
        driver.feed(m.encode(m.Cancel(request=driver.server.request.start.request)))
    assert driver.server.state is s.ServerState.READY
    before = driver.verdicts
    driver.feed(m.encode(m.Start(request=10_000, prompt=[1, 5], max_new_tokens=8,
                                 sampling=m.Sampling(temperature=0.0))))
    driver.feed(m.encode(m.Draft(request=10_000, round=0, position=2, parent=5, tokens=[7, 8])))
    assert driver.verdicts == before + 1


def _shaken_hands() -> tuple[s.ServerSession, s.ClientSession]:
    server, client = _server(), s.ClientSession(tokenizer="fp")
    for action in server.receive(client.hello()):
        client.receive(action.data)
    return server, client


@fz.fuzz_settings(150)
@given(st.data())
def test_client_session_turns_any_server_traffic_into_events_or_protocol_errors(data):
    _pair_server, client = _shaken_hands()
    client.start([1, 5, 6], max_new_tokens=20, sampling=m.Sampling(temperature=0.0))
    for _ in range(data.draw(st.integers(0, 3))):
        client.draft(data.draw(st.lists(fz.token, min_size=1, max_size=4)))
    frames = st.one_of(fz.frames_from(fz.server_messages),
                       st.builds(m.Verdict, request=st.just(0), round=st.integers(0, 4),
                                 position=st.integers(2, 5), accepted=st.integers(0, 5), token=fz.token,
                                 finished=st.booleans()).map(m.encode))
    for _ in range(data.draw(st.integers(1, 30))):
        before = list(client.committed)
        try:
            events = client.receive(data.draw(frames))
        except ProtocolError as exc:
            assert isinstance(exc.code, ErrorCode)
            continue
        assert client.committed[: len(before)] == before, "the committed sequence only grows"
        for event in events:
            assert isinstance(event, s.Welcomed | s.RequestStarted | s.RoundVerdict | s.RoundDiscarded
                              | s.TokensStreamed | s.RequestCancelled | s.ServerFailed)


@fz.fuzz_settings(150)
@given(st.data())
def test_rounds_sent_ahead_keep_both_sides_committed_sequences_equal(data):
    """Pipelined rounds with right and wrong guesses: verdicts and discards keep client == server."""
    server, client = _shaken_hands()
    greedy = m.Sampling(temperature=0.0)
    start = client.start(data.draw(st.lists(fz.token, min_size=1, max_size=8)), max_new_tokens=30, sampling=greedy)
    for action in server.receive(start):
        if isinstance(action, s.StartRequested):
            for sent in server.started(action.reusable):
                client.receive(sent.data)
    while client.state is s.ClientState.ACTIVE:
        frames = []
        assumed: list[int] = []
        for _ in range(data.draw(st.integers(1, 3))):  # this round, then rounds drafted ahead on guesses
            tokens = data.draw(st.lists(fz.token, min_size=1, max_size=3))
            frames.append(client.draft(tokens, assumed=assumed or None)[1])
            assumed = assumed + tokens + [data.draw(st.sampled_from([tokens[-1], 7]))]
        for frame in frames:
            for action in server.receive(frame):
                if isinstance(action, s.DraftReceived):
                    gamma = len(action.draft.tokens)
                    action = server.verdict(RoundResult(accepted=data.draw(st.integers(0, gamma)),
                                                        token=data.draw(st.sampled_from([7, 9, 2]))))[0]
                assert isinstance(action, s.Send)
                for event in client.receive(action.data):
                    assert not isinstance(event, s.ServerFailed), event
        assert client.committed == server.committed
    assert client.finished and client.committed == server.committed
