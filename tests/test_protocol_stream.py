"""``stream``: a speculative request hands stretches to the verifier generating alone, and takes drafts again.

The sans-I/O sessions first (the chunk's bookkeeping, the client's checks, what an old server's welcome
means), then the rules of docs/protocol.md §3/§8 against a running verifier with hand-built frames:
the same request throughout (one prefill), wrong state, wrong mode, bad ``tokens``, and cancel.
"""

from __future__ import annotations

import msgspec
import pytest
import torch
from transformers import AutoModelForCausalLM

from specd.daemon.server import Verifier
from specd.shared import messages as m
from specd.shared import protocol as s
from specd.shared.errors import ErrorCode, ProtocolError
from specd.shared.sampling import RoundResult, SamplingParams, target_probs
from tests.daemon_support import daemon_config
from tests.raw_frames import PROMPT, draft, enc, start
from tests.test_protocol_rules import Peer
from tests.test_session import EOS, LIMITS, Pair, _draft_frame_raw, _errors, _server
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)


def stream(tokens: int, request: int = 0) -> bytes:
    return enc({"type": "stream", "request": request, "tokens": tokens})


def _pair() -> Pair:
    """Sessions back to back, the server announcing ``stream``."""
    return Pair(server=_server(limits=msgspec.structs.replace(LIMITS, max_stream_tokens=32)))


# -- the sessions, sans I/O --------------------------------------------------------------------------

def test_a_stream_chunk_returns_to_drafts_after_its_last_token():
    pair = _pair().ready(max_new_tokens=8)
    pair.server.receive(pair.client.draft([7])[1])
    pair.deliver(pair.server.verdict(RoundResult(accepted=1, token=8)))
    assert [type(a) for a in pair.server.receive(pair.client.stream(2))] == [s.StreamRequested]
    assert pair.server.state is s.ServerState.STREAMING_CHUNK and pair.client.stream_owed == 2
    assert pair.server.receive(pair.client.stream(1)) == []  # adds to the running stretch
    for token in (9, 10, 11):
        assert pair.server.streaming
        actions, done = pair.server.stream([token])
        assert not done and isinstance(pair.deliver(actions)[0], s.TokensStreamed)
    assert pair.server.state is s.ServerState.SPECULATING and not pair.server.streaming
    assert pair.client.stream_owed == 0 and pair.client.generated == [7, 8, 9, 10, 11]
    _, frame = pair.client.draft([12])  # drafts continue at the committed length
    assert isinstance(pair.server.receive(frame)[0], s.DraftReceived)


def test_a_driver_handing_more_tokens_than_the_chunk_owes_sends_only_those_asked_for():
    """The session, not the driver, keeps the chunk exact: extra tokens are dropped, and the next
    ``stream`` asks the driver for exactly its own count (found by fuzzing at 2000 examples)."""
    pair = _pair().ready(max_new_tokens=8)
    pair.server.receive(pair.client.stream(1))
    actions, done = pair.server.stream([9, 10, 11])
    assert not done and [e.tokens.tokens for e in pair.deliver(actions)] == [[9]]
    assert pair.server.state is s.ServerState.SPECULATING and pair.server.request.chunk == 0
    assert pair.server.committed == pair.client.committed
    assert [type(a) for a in pair.server.receive(pair.client.stream(2))] == [s.StreamRequested]
    assert pair.server.request.chunk == 2


def test_a_streams_tokens_carry_their_probabilities_and_cloud_modes_do_not():
    """In a ``stream`` each token comes with p(token) as the target sampled it (the client's drafter scores
    it), kept for the tokens sent; cloud mode has no drafter to score them, so none are sent."""
    pair = _pair().ready(max_new_tokens=8)
    pair.server.receive(pair.client.stream(3))
    actions, _ = pair.server.stream([9], probs=[0.25])
    assert [(e.tokens.tokens, e.tokens.probs) for e in pair.deliver(actions)] == [([9], [0.25])]
    actions, _ = pair.server.stream([10, 11, 12], probs=[0.5, 0.75, 1.0])  # one more than the chunk owes
    assert [(e.tokens.tokens, e.tokens.probs) for e in pair.deliver(actions)] == [([10, 11], [0.5, 0.75])]
    cloud = Pair().ready(mode="cloud", max_new_tokens=5)
    actions, _ = cloud.server.stream([7], probs=[0.5])
    assert [(e.tokens.tokens, e.tokens.probs) for e in cloud.deliver(actions)] == [([7], [])]


def test_a_stop_rule_inside_a_stream_ends_the_request():
    pair = _pair().ready(max_new_tokens=8)
    pair.server.receive(pair.client.stream(5))
    actions, done = pair.server.stream([EOS])
    assert done and pair.deliver(actions)[0].tokens.reason == "eos"
    assert pair.server.state is s.ServerState.READY and pair.client.finished
    with pytest.raises(RuntimeError, match="active speculative request"):
        pair.client.stream(1)
    assert pair.server.receive(m.encode(m.Stream(request=0, tokens=1))) == [], "ended: ignored silently"


def test_a_draft_while_a_stream_runs_is_refused_and_the_stream_goes_on():
    pair = _pair().ready()
    pair.server.receive(pair.client.stream(3))
    error = _errors(pair.server.receive(_draft_frame_raw(0)))[0]
    assert (error["code"], error["request"]) == ("wrong_mode", None)
    assert pair.server.state is s.ServerState.STREAMING_CHUNK


def test_the_client_refuses_more_tokens_than_it_asked_for():
    pair = _pair().ready()
    pair.server.receive(pair.client.stream(1))
    pair.server.request.chunk = 5  # a server that streams past what was asked
    pair.deliver(pair.server.stream([9])[0])
    with pytest.raises(ProtocolError) as caught:
        pair.deliver(pair.server.stream([10])[0])
    assert caught.value.code is ErrorCode.UNEXPECTED_MESSAGE and "1 tokens streamed, 0 asked for" in str(caught.value)


def test_a_welcome_without_max_stream_tokens_means_no_stream_and_unknown_fields_are_ignored():
    """An older verifier announces no ``max_stream_tokens``: the client sends no ``stream``. A newer one may
    announce fields this client does not know (docs/protocol.md §1): they are ignored."""
    limits = {"max_input_tokens": 16, "max_total_tokens": 32, "max_draft": 4, "max_support": 8,
              "max_frame_bytes": 4096, "a_future_limit": 3}
    welcome = enc({"type": "welcome", "protocol": 1, "session": "x", "model": "tiny", "tokenizer": "fp",
                   "vocab_size": 64, "eos": [EOS], "limits": limits, "a_future_field": True})
    client = s.ClientSession(tokenizer="fp")
    client.hello()
    assert isinstance(client.receive(welcome)[0], s.Welcomed) and not client.can_stream
    client.start([1, 5, 6], max_new_tokens=4)
    with pytest.raises(RuntimeError, match="does not take 'stream'"):
        client.stream(2)


# -- against a running verifier --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)


@pytest.fixture
async def verifier(tiny_folder):
    async with Verifier(daemon_config(tiny_folder)) as v:
        yield v


async def _tokens(peer: Peer, count: int) -> list[m.Tokens]:
    got: list[m.Tokens] = []
    while sum(len(t.tokens) for t in got) < count:
        msg = await peer.next()
        assert isinstance(msg, m.Tokens), msg
        got.append(msg)
    return got


async def test_rounds_and_streams_alternate_in_one_request_with_one_prefill(verifier):
    peer = await Peer.open(verifier.url)
    welcome_limits = verifier.limits
    assert welcome_limits.max_stream_tokens == welcome_limits.max_total_tokens > 0
    assert isinstance(await peer.ask(start(max_new_tokens=12)), m.Started)
    verdict = await peer.ask(draft([7]))
    assert isinstance(verdict, m.Verdict)
    position = 3 + verdict.accepted + 1
    await peer.send(stream(2))
    streamed = await _tokens(peer, 2)
    assert [t.position for t in streamed] == [position, position + 1]
    parent = streamed[-1].tokens[-1]
    verdict = await peer.ask(draft([7, 7], round_=1, position=position + 2, parent=parent))
    assert isinstance(verdict, m.Verdict), "drafts are taken again after the last streamed token"
    await peer.send(draft([7], round_=2, position=position + 3 + verdict.accepted, parent=verdict.token))
    await peer.send(stream(50))  # a probe: a round, then a stretch; the stretch runs to the request's end
    assert isinstance(await peer.next(), m.Verdict)
    last = None
    while last is None or not last.finished:
        last = await peer.next()
        assert isinstance(last, m.Tokens)
    assert last.reason == "length"
    assert verifier.metrics.requests["speculative"] == 1
    assert verifier.metrics.prefill_tokens == 2, "switching recomputed nothing (the prompt's 3 tokens, less one)"
    await peer.send(stream(1))  # for the ended request: ignored silently, so the next answer is the start's
    assert isinstance(await peer.ask(start(1)), m.Started)


async def test_each_streamed_token_comes_with_the_targets_probability_of_it(verifier, tiny_folder):
    """The verifier's ``probs`` are p(token) of the target's own law at each position, under the request's
    sampling (here temperature 0.7, top-p 0.9): what a client needs to score its draft on the stream."""
    sampling = {"temperature": 0.7, "top_p": 0.9}
    params = SamplingParams(temperature=0.7, top_p=0.9)
    peer = await Peer.open(verifier.url)
    assert isinstance(await peer.ask(start(max_new_tokens=12, sampling=sampling, seed=3)), m.Started)
    await peer.send(stream(6))
    streamed = await _tokens(peer, 6)
    tokens = [t for msg in streamed for t in msg.tokens]
    probs = [p for msg in streamed for p in msg.probs]
    assert len(probs) == len(tokens) == 6
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, torch_dtype=torch.float32).eval()
    sequence = [*PROMPT, *tokens]
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0]
    for i, (token, prob) in enumerate(zip(tokens, probs, strict=True)):
        law = target_probs(logits[len(PROMPT) - 1 + i], params)
        assert prob == pytest.approx(float(law[token]), abs=1e-4)
        assert 0.0 < prob <= 1.0


@pytest.mark.parametrize("bad,code,named", [
    (stream(0), "bad_message", None),  # tokens ≥ 1, by the schema
    (stream(10**6), "bad_message", None),  # over max_stream_tokens
    (stream(2, request=42), "unknown_request", 42),
    (enc({"type": "stream", "request": 0}), "bad_message", None),
], ids=["zero", "over-the-limit", "unknown-id", "no-tokens"])
async def test_a_bad_stream_is_refused_and_the_request_goes_on(verifier, bad, code, named):
    peer = await Peer.open(verifier.url)
    assert isinstance(await peer.ask(start()), m.Started)
    error = await peer.ask(bad)
    assert (error.code, error.request, error.fatal) == (code, named, False)
    assert isinstance(await peer.ask(draft([7], round_=1)), m.Verdict), "the request goes on"


async def test_stream_in_the_wrong_state_or_mode(verifier):
    peer = await Peer.open(verifier.url)
    error = await peer.ask(stream(2))  # READY: no request ever started
    assert (error.code, error.request) == ("unknown_request", 0)
    await peer.send(start(mode="cloud", max_new_tokens=30))
    await peer.send(stream(2))
    seen, finished = None, False
    while not finished:
        msg = await peer.next()
        if isinstance(msg, m.Error):
            seen = msg
        finished = isinstance(msg, m.Tokens) and msg.finished
    assert (seen.code, seen.request, seen.fatal) == ("wrong_mode", None, False), "the cloud stream went on"
    before = await Peer.open(verifier.url, hello=False)
    await before.send(stream(1))
    error = await before.next()
    assert (error.code, error.fatal) == ("unexpected_message", True)


async def test_a_draft_during_a_stream_is_refused_and_cancel_stops_it(verifier):
    peer = await Peer.open(verifier.url)
    assert isinstance(await peer.ask(start(max_new_tokens=200)), m.Started)
    await peer.send(stream(150))
    await peer.send(draft([7]))
    seen = None
    while seen is None:
        msg = await peer.next()
        if isinstance(msg, m.Error):
            seen = msg
        else:
            assert isinstance(msg, m.Tokens)
    assert (seen.code, seen.request) == ("wrong_mode", None)
    await peer.send(enc({"type": "cancel", "request": 0}))
    while not isinstance(msg := await peer.next(), m.Cancelled):
        assert isinstance(msg, m.Tokens)
    assert isinstance(await peer.ask(start(1)), m.Started), "back to READY"


def test_the_stream_message_is_in_the_schema():
    assert m.decode_client(stream(3)) == m.Stream(request=0, tokens=3)
    assert msgspec.msgpack.decode(m.encode(m.Stream(request=1, tokens=2))) == {"type": "stream", "request": 1,
                                                                                 "tokens": 2}
