"""The sans-I/O session state machines, driven directly with frames: no sockets, no sleeps."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from specd.daemon.rounds import decode_round
from specd.shared import messages as m
from specd.shared import protocol as s
from specd.shared.errors import CloseCode, ErrorCode, ProposalError, ProtocolError
from specd.shared.sampling import (
    RoundResult,
    SamplingParams,
    decode_proposal,
    encode_proposal,
    sample_proposal,
    sparse_proposal,
)

LIMITS = m.Limits(max_input_tokens=16, max_total_tokens=32, max_draft=4, max_support=8, max_frame_bytes=4096)
EOS = 2


def _server(**kw) -> s.ServerSession:
    args = dict(session_id="s1", model="tiny", tokenizer="fp", vocab_size=64, eos=[EOS], limits=LIMITS)
    args.update(kw)
    return s.ServerSession(**args)


class Pair:
    """A client and a server session wired back to back; server actions other than Send are kept."""

    def __init__(self, server=None, client=None):
        self.server = server or _server()
        self.client = client or s.ClientSession(tokenizer="fp")
        self.actions: list = []
        self.errors: list = []

    def to_server(self, frame: bytes):
        events = []
        for action in self.server.receive(frame):
            if isinstance(action, s.Send):
                events += self.to_client(action.data)
            else:
                self.actions.append(action)
        return events

    def to_client(self, frame: bytes):
        events = self.client.receive(frame)
        self.errors += [e.error for e in events if isinstance(e, s.ServerFailed)]
        return events

    def deliver(self, actions):
        events = []
        for action in actions:
            if isinstance(action, s.Send):
                events += self.to_client(action.data)
        return events

    def ready(self, prompt=(1, 5, 6), **start):
        self.to_server(self.client.hello())
        start.setdefault("max_new_tokens", 8)
        start.setdefault("sampling", m.Sampling(temperature=0.0))
        self.to_server(self.client.start(list(prompt), **start))
        return self


def _errors(actions):
    return [msgspec.msgpack.decode(a.data) for a in actions if isinstance(a, s.Send)
            and msgspec.msgpack.decode(a.data)["type"] == "error"]


def test_handshake_welcomes_with_limits_and_fingerprint():
    pair = Pair()
    events = pair.to_server(pair.client.hello())
    assert isinstance(events[0], s.Welcomed)
    assert events[0].welcome.limits == LIMITS and events[0].welcome.eos == [EOS]
    assert pair.server.state is s.ServerState.READY and pair.client.state is s.ClientState.READY


@pytest.mark.parametrize("first,code", [
    (m.Start(request=0, prompt=[1], max_new_tokens=1), "unexpected_message"),
    (m.Hello(protocol=99, tokenizer="fp"), "unsupported_version"),
    (m.Hello(protocol=m.PROTOCOL_VERSION, tokenizer="other"), "tokenizer_mismatch"),
])
def test_bad_handshakes_are_fatal(first, code):
    server = _server()
    actions = server.receive(m.encode(first))
    assert _errors(actions)[0]["code"] == code and _errors(actions)[0]["fatal"] is True
    assert isinstance(actions[-1], s.Close) and server.state is s.ServerState.CLOSED
    assert server.receive(m.encode(first)) == []


def test_garbage_before_hello_closes_but_after_hello_only_errors():
    server = _server()
    assert isinstance(server.receive(b"\xc1")[-1], s.Close)
    pair = Pair()
    pair.to_server(pair.client.hello())
    for junk in (b"\xc1", b"\x91\x01", "text", msgspec.msgpack.encode({"type": "nope"})):
        actions = pair.server.receive(junk)
        assert _errors(actions)[0]["code"] == "bad_frame" and not any(isinstance(a, s.Close) for a in actions)
    assert pair.server.state is s.ServerState.READY


def test_client_refuses_a_server_with_another_tokenizer():
    client = s.ClientSession(tokenizer="mine")
    client.hello()
    welcome = m.Welcome(protocol=1, session="x", model="big", tokenizer="theirs", vocab_size=10, eos=[],
                        limits=LIMITS)
    with pytest.raises(ProtocolError) as err:
        client.receive(m.encode(welcome))
    assert err.value.code is ErrorCode.TOKENIZER_MISMATCH


@pytest.mark.parametrize("start,code", [
    (dict(prompt=list(range(3, 20))), "prompt_too_long"),
    (dict(prompt=[]), "bad_message"),
    (dict(prompt=[1, 70]), "bad_token"),
    (dict(prompt=[1], stop=[64]), "bad_token"),
])
def test_start_is_checked_against_limits(start, code):
    pair = Pair()
    pair.to_server(pair.client.hello())
    actions = pair.server.receive(m.encode(m.Start(request=0, max_new_tokens=4, **start)))
    assert _errors(actions)[0]["code"] == code
    assert pair.server.state is s.ServerState.READY


def test_prompt_filling_the_context_is_refused():
    limits = msgspec.structs.replace(LIMITS, max_input_tokens=40)
    pair = Pair(server=_server(limits=limits))
    pair.to_server(pair.client.hello())
    actions = pair.server.receive(m.encode(m.Start(request=0, prompt=[5] * 32, max_new_tokens=4)))
    assert _errors(actions)[0]["code"] == "context_full"


def test_second_start_while_active_is_refused_and_ids_are_not_reused():
    pair = Pair().ready()
    actions = pair.server.receive(m.encode(m.Start(request=7, prompt=[1], max_new_tokens=1)))
    assert _errors(actions)[0]["code"] == "request_active"
    pair.to_server(pair.client.cancel())
    actions = pair.server.receive(m.encode(m.Start(request=0, prompt=[1], max_new_tokens=1)))
    assert _errors(actions)[0]["code"] == "bad_message"


def _draft_frame(pair, tokens, *, proposal=None, **fields):
    _, frame = pair.client.draft(tokens, None if proposal is None else encode_proposal(proposal))
    if fields:
        msg = msgspec.structs.replace(m.decode_client(frame), **fields)
        frame = m.encode(msg)
    return frame


def test_greedy_round_commits_accepted_drafts_plus_token_on_both_sides():
    pair = Pair().ready()
    actions = pair.server.receive(_draft_frame(pair, [7, 8, 9]))
    received = actions[0]
    assert isinstance(received, s.DraftReceived) and received.greedy and not received.draft.q_ids
    assert received.draft.tokens == [7, 8, 9] and received.draft.parent == 6 and received.draft.position == 3
    with pytest.raises(RuntimeError):
        pair.server.receive(_draft_frame(pair, [1]))
    events = pair.deliver(pair.server.verdict(RoundResult(accepted=2, token=11)))
    assert events[0].new_tokens == [7, 8, 11] and events[0].drafted == 3
    assert pair.client.committed == pair.server.committed == [1, 5, 6, 7, 8, 11]


def test_stale_and_wrong_parent_drafts_are_discarded_without_work():
    pair = Pair().ready()
    for frame in (_draft_frame(pair, [7], position=5), _draft_frame(pair, [7], parent=9)):
        actions = pair.server.receive(frame)
        assert len(actions) == 1 and isinstance(actions[0], s.Send)
        events = pair.to_client(actions[0].data)
        assert isinstance(events[0], s.RoundDiscarded)
    assert pair.client.in_flight == 0


def test_round_drafted_ahead_is_used_when_the_verdict_confirms_it():
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7, 8]))
    _, ahead = pair.client.draft([20, 21], assumed=[7, 8, 9])
    pair.deliver(pair.server.verdict(RoundResult(accepted=2, token=9, bonus=True)))
    actions = pair.server.receive(ahead)
    assert isinstance(actions[0], s.DraftReceived) and actions[0].draft.position == 6
    pair.deliver(pair.server.verdict(RoundResult(accepted=1, token=30)))
    assert pair.client.committed == [1, 5, 6, 7, 8, 9, 20, 30]


@pytest.mark.parametrize("tokens,fields,code", [
    ([], {}, "draft_too_long"),
    ([7] * 5, {}, "draft_too_long"),
    ([70], {}, "bad_token"),
    ([7], {"request": 9}, "unknown_request"),
])
def test_bad_drafts_get_error_codes_and_the_session_survives(tokens, fields, code):
    pair = Pair().ready()
    events = pair.deliver(pair.server.receive(_draft_frame(pair, tokens, **fields)))
    assert events[0].error.code == code
    if code != "unknown_request":  # an error naming the request ended it, on both sides
        assert pair.server.state is s.ServerState.READY and pair.client.state is s.ClientState.READY
        pair.to_server(pair.client.start([1, 5, 6], max_new_tokens=4, sampling=m.Sampling(temperature=0.0)))
    assert isinstance(pair.server.receive(_draft_frame(pair, [7]))[0], s.DraftReceived)


def test_rounds_must_increase():
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7]))
    pair.deliver(pair.server.verdict(RoundResult(accepted=1, token=8)))
    actions = pair.server.receive(_draft_frame(pair, [9], round=0))
    assert _errors(actions)[0]["code"] == "unexpected_message"


def test_drafts_beyond_the_context_are_refused():
    pair = Pair().ready(prompt=[1] * 16, max_new_tokens=100)
    for _ in range(3):
        pair.server.receive(_draft_frame(pair, [7, 7, 7, 7]))
        pair.deliver(pair.server.verdict(RoundResult(accepted=4, token=7)))
    assert len(pair.client.committed) == 31
    actions = pair.server.receive(_draft_frame(pair, [7, 7]))
    assert _errors(actions)[0]["code"] == "context_full"


def _sampled_pair():
    return Pair().ready(sampling=m.Sampling(temperature=1.0))


def _proposal(gamma=2, k=4):
    proposal = sparse_proposal(torch.randn(gamma, 64), SamplingParams(1.0), k)
    return sample_proposal(proposal, torch.Generator().manual_seed(0)).tolist(), proposal


def test_sampled_round_carries_the_exact_proposal():
    pair = _sampled_pair()
    drafts, proposal = _proposal()
    draft = pair.server.receive(_draft_frame(pair, drafts, proposal=proposal))[0].draft
    received = decode_proposal(draft.q_ids, draft.q_probs, len(draft.tokens), draft.support)
    assert torch.equal(received.ids, proposal.ids)
    assert torch.equal(received.probs, proposal.probs)


def _raw(probs, ids=(3, 4)):
    import numpy as np
    return np.array(ids, "<i4").tobytes(), np.array(probs, "<f4").tobytes()


@pytest.mark.parametrize("probs,fields,match", [
    ([math.nan, 1.0], {}, "finite"),
    ([math.inf, 0.0], {}, "finite"),
    ([1.5, -0.5], {}, "non-negative"),
    ([0.3, 0.3], {}, "sum to 1"),
    ([1.0, 0.0], {"tokens": [4]}, "outside its own proposal support"),
    ([0.5, 0.5], {"support": 0}, "support 0"),
    ([0.5, 0.5], {"support": 9}, "support 9"),
    ([0.5, 0.5], {"q_probs": b"\0" * 4}, "must each be"),
])
def test_bad_proposals_are_refused(probs, fields, match):
    pair = _sampled_pair()
    q_ids, q_probs = _raw(probs)
    msg = m.Draft(request=0, round=0, position=3, parent=6, tokens=[3], support=2, q_ids=q_ids, q_probs=q_probs)
    actions = pair.server.receive(m.encode(msgspec.structs.replace(msg, **fields)))
    if isinstance(actions[0], s.DraftReceived):  # sizes fit: the verifier checks the content, as the daemon does
        with pytest.raises(ProposalError) as refused:
            decode_round(actions[0].draft, actions[0].greedy, pair.server.vocab_size)
        actions = pair.server.error(ErrorCode.BAD_PROPOSAL, str(refused.value), request=0)
    error = _errors(actions)[0]
    assert error["code"] == "bad_proposal" and match in error["message"]


def test_eos_among_accepted_drafts_ends_the_answer_there():
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7, EOS, 9]))
    events = pair.deliver(pair.server.verdict(RoundResult(accepted=3, token=10, bonus=True)))
    verdict = events[0].verdict
    assert (verdict.accepted, verdict.token, verdict.finished, verdict.reason) == (1, EOS, True, "eos")
    assert pair.client.generated == [7, EOS] and pair.server.state is s.ServerState.READY


@pytest.mark.parametrize("stop,max_new,expected,reason", [
    ([9], 8, [7, 8, 9], "stop"),
    ([], 2, [7, 8], "length"),
])
def test_stop_ids_and_max_new_tokens_truncate_the_round(stop, max_new, expected, reason):
    pair = Pair().ready(stop=stop, max_new_tokens=max_new)
    pair.server.receive(_draft_frame(pair, [7, 8, 9]))
    events = pair.deliver(pair.server.verdict(RoundResult(accepted=3, token=10, bonus=True)))
    assert pair.client.generated == expected and events[0].verdict.reason == reason


def test_next_request_reuses_the_committed_prefix():
    pair = Pair().ready(max_new_tokens=2)
    pair.server.receive(_draft_frame(pair, [7]))
    pair.deliver(pair.server.verdict(RoundResult(accepted=1, token=8, bonus=True)))
    assert pair.client.finished and pair.client.reason == "length"
    pair.to_server(pair.client.start([1, 5, 6, 7, 8, 4, 4], max_new_tokens=2,
                                     sampling=m.Sampling(temperature=0.0)))
    started = pair.actions[-1]
    assert isinstance(started, s.StartRequested) and started.reusable == 5


def test_late_draft_for_a_finished_request_is_discarded():
    pair = Pair().ready(max_new_tokens=1)
    pair.server.receive(_draft_frame(pair, [7]))
    _, late = pair.client.draft([9], assumed=[7, 8])
    pair.deliver(pair.server.verdict(RoundResult(accepted=0, token=8)))
    actions = pair.server.receive(late)
    assert msgspec.msgpack.decode(actions[0].data)["type"] == "discarded"


def test_cancel_ends_a_speculative_request():
    pair = Pair().ready()
    events = pair.to_server(pair.client.cancel())
    assert isinstance(events[0], s.RequestCancelled) and pair.client.reason == "cancelled"
    assert pair.server.state is s.ServerState.READY
    assert pair.server.receive(pair.client.cancel()) == []


def test_cloud_mode_streams_tokens_and_cancels_between_steps():
    pair = Pair().ready(mode="cloud", max_new_tokens=5)
    assert pair.server.state is s.ServerState.STREAMING
    actions, done = pair.server.stream([7])
    assert not done and isinstance(pair.deliver(actions)[0], s.TokensStreamed)
    assert _errors(pair.server.receive(_draft_frame_raw(0)))[0]["code"] == "wrong_mode"
    assert isinstance(pair.server.receive(pair.client.cancel())[0], s.CancelRequested)
    assert pair.server.cancel_requested
    events = pair.deliver(pair.server.finish_cancel())
    assert isinstance(events[0], s.RequestCancelled) and pair.client.generated == [7]


def _draft_frame_raw(request):
    return m.encode(m.Draft(request=request, round=0, position=4, parent=7, tokens=[1]))


def test_cloud_mode_stops_at_eos():
    pair = Pair().ready(mode="cloud", max_new_tokens=5)
    actions, done = pair.server.stream([7, EOS, 9])
    assert done
    events = pair.deliver(actions)
    assert events[0].tokens.tokens == [7, EOS] and events[0].tokens.reason == "eos"


def test_server_error_ends_the_request_on_both_sides():
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7]))
    pair.deliver(pair.server.error(ErrorCode.INTERNAL, "the model failed", request=0))
    assert pair.errors[0].code == "internal" and pair.client.state is s.ClientState.READY
    assert pair.server.state is s.ServerState.READY


def test_rate_limit_closes_a_flooding_connection():
    limits = msgspec.structs.replace(LIMITS, max_messages_per_second=5)
    server = _server(limits=limits)
    hello = m.encode(m.Hello(protocol=m.PROTOCOL_VERSION, tokenizer="fp"))
    server.receive(hello, now=0.0)
    actions = []
    for i in range(20):
        actions = server.receive(m.encode(m.Cancel(request=0)), now=0.001 * i)
        if any(isinstance(a, s.Close) for a in actions):
            break
    assert _errors(actions)[0]["code"] == "rate_limited" and isinstance(actions[-1], s.Close)
    assert actions[-1].code == CloseCode.POLICY_VIOLATION


def test_a_limiter_without_a_rate_never_waits():
    limiter = s.RateLimiter(0)
    assert all(limiter.allow(0.0) for _ in range(10_000)) and limiter.delay(0.0) == 0.0


def test_oversized_frame_is_refused():
    pair = Pair()
    pair.to_server(pair.client.hello())
    actions = pair.server.receive(m.encode(m.Start(request=0, prompt=[200] * 3000, max_new_tokens=1)))
    assert _errors(actions)[0]["code"] == "frame_too_large"
