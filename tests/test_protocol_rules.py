"""The rules of docs/protocol.md that a third-party client relies on, checked against a running verifier.

Each test is one statement of the page: greedy proposals, which errors end a request, message size,
idleness and pings, refusals before ``hello``, prompt closing after fatal errors, request ids, numbers,
cancels of ended requests, and what ``vocab_size`` means. Frames are built by hand (msgpack maps), as a
client written from the page alone would build them.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time

import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from specd.daemon.server import Verifier
from specd.shared import messages as m
from specd.shared.fingerprint import tokenizer_fingerprint
from tests.daemon_support import daemon_config
from tests.raw_frames import FINGERPRINT, GREEDY, SAMPLED, draft, enc, start
from tests.tiny_models import save_tiny_model, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)


def row(ids: list[int], probs: list[float]) -> dict:
    return {"support": len(ids), "q_ids": struct.pack(f"<{len(ids)}i", *ids),
            "q_probs": struct.pack(f"<{len(probs)}f", *probs)}


class Peer:
    """A hand-written client: raw frames out, decoded server messages in."""

    def __init__(self, ws) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, url: str, *, hello: bool = True, **connect_kwargs) -> Peer:
        peer = cls(await connect(url, compression=None, max_size=None, **connect_kwargs))
        if hello:
            await peer.send(enc({"type": "hello", "protocol": 1, "tokenizer": FINGERPRINT}))
            assert isinstance(await peer.next(), m.Welcome)
        return peer

    async def send(self, frame: bytes) -> None:
        await self.ws.send(frame)

    async def next(self, timeout: float = 30.0) -> m.ServerMessage:
        return m.decode_server(await asyncio.wait_for(self.ws.recv(), timeout))

    async def ask(self, frame: bytes) -> m.ServerMessage:
        await self.send(frame)
        return await self.next()


@pytest.fixture
async def verifier(tiny_folder):
    async with Verifier(daemon_config(tiny_folder)) as v:
        yield v


# -- 1. greedy requests take no proposal ------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    row([7, 8], [0.5, 0.5]),  # a valid-looking row
    row([7], [0.25]),  # a row summing to 0.25
    {"support": 0, "q_ids": struct.pack("<i", 7), "q_probs": b""},  # support 0 but bytes
    {"support": 0, "q_ids": b"", "q_probs": struct.pack("<f", 1.0)},
], ids=["support-1-row", "row-sum-0.25", "support-0-with-ids", "support-0-with-probs"])
async def test_a_proposal_sent_for_a_greedy_request_is_refused_and_ends_it(verifier, fields):
    peer = await Peer.open(verifier.url)
    assert isinstance(await peer.ask(start()), m.Started)
    error = await peer.ask(draft([7], **fields))
    assert (error.code, error.request, error.fatal) == ("bad_proposal", 0, False)
    assert isinstance(await peer.ask(draft([7], round_=1)), m.Discarded), "the request has ended"
    assert isinstance(await peer.ask(start(1)), m.Started), "the connection is back to READY"
    assert isinstance(await peer.ask(draft([7], request=1)), m.Verdict), "a greedy round without one works"


# -- 2. which errors end the request ----------------------------------------------------------------

async def _active_goes_on(peer: Peer, request: int = 0, round_: int = 5) -> None:
    verdict = await peer.ask(draft([7], request=request, round_=round_))
    assert isinstance(verdict, m.Verdict) and verdict.request == request


@pytest.mark.parametrize("bad,code,named", [
    (draft([7], extra=1), "bad_message", None),  # schema-level: names no request
    (b"\xc1garbage", "bad_frame", None),
    (enc({"type": "hello", "protocol": 1, "tokenizer": FINGERPRINT}), "unexpected_message", None),
    (enc({"type": "cancel", "request": 42}), "unknown_request", 42),  # a stray cancel for another id
    (draft([7], request=42), "unknown_request", 42),
    (start(0), "request_active", 0),  # even when the refused start repeats the active id
    (start(9), "request_active", 9),
], ids=["bad_message", "bad_frame", "second-hello", "stray-cancel", "stray-draft", "start-same-id",
        "start-other-id"])
async def test_errors_that_leave_the_active_request_running(verifier, bad, code, named):
    peer = await Peer.open(verifier.url)
    assert isinstance(await peer.ask(start()), m.Started)
    error = await peer.ask(bad)
    assert (error.code, error.request, error.fatal) == (code, named, False)
    await _active_goes_on(peer)


@pytest.mark.parametrize("bad,code", [
    (draft([7], round_=0), "unexpected_message"),  # a repeated round
    (draft([64], round_=1), "bad_token"),
    (draft([], round_=1), "draft_too_long"),
    (draft([7], round_=1, **row([8], [1.0])), "bad_proposal"),
], ids=["repeated-round", "bad_token", "draft_too_long", "bad_proposal"])
async def test_errors_that_end_the_request_they_name(verifier, bad, code):
    peer = await Peer.open(verifier.url)
    assert isinstance(await peer.ask(start(sampling=SAMPLED if code == "bad_proposal" else GREEDY)), m.Started)
    if code == "unexpected_message":
        await _active_goes_on(peer, round_=0)
    error = await peer.ask(bad)
    assert (error.code, error.request, error.fatal) == (code, 0, False)
    assert isinstance(await peer.ask(draft([7], round_=7)), m.Discarded), "the request has ended"


async def test_a_wrong_mode_draft_leaves_the_stream_running(verifier):
    peer = await Peer.open(verifier.url)
    await peer.send(start(mode="cloud", max_new_tokens=60))
    await peer.send(draft([7]))
    seen_error, finished = None, False
    while not finished:
        msg = await peer.next()
        if isinstance(msg, m.Error):
            seen_error = msg
        elif isinstance(msg, m.Tokens):
            finished = msg.finished
    assert (seen_error.code, seen_error.request) == ("wrong_mode", None)


async def test_a_context_full_start_never_began_and_leaves_its_id_unused(tiny_folder):
    async with Verifier(daemon_config(tiny_folder, max_total_tokens=8, max_input_tokens=7)) as v:
        peer = await Peer.open(v.url)
        error = await peer.ask(enc({"type": "start", "request": 3, "prompt": [1] * 8, "max_new_tokens": 2}))
        assert (error.code, error.request) in {("context_full", 3), ("prompt_too_long", 3)}
        assert isinstance(await peer.ask(start(3)), m.Started)


# -- 3. the size limit is per message --------------------------------------------------------------

async def test_a_fragmented_message_over_the_limit_gets_close_1009_and_no_error(tiny_folder):
    async with Verifier(daemon_config(tiny_folder, max_frame_bytes=4096)) as v:
        peer = await Peer.open(v.url)
        fragments = [b"\x00" * 1500] * 4  # each under the limit, 6000 bytes together
        with contextlib.suppress(ConnectionClosed):
            await peer.ws.send(iter(fragments))
        with pytest.raises(ConnectionClosed):
            await peer.next()  # no error message: the connection just closes
        assert peer.ws.close_code == 1009
        # a fragmented message under the limit is a message like any other
        other = await Peer.open(v.url)
        await other.ws.send(iter([start()[:5], start()[5:]]))
        assert isinstance(await other.next(), m.Started)


# -- 4. idleness: announced, and pings are not activity ----------------------------------------------

async def test_idle_timeout_is_announced_and_pings_do_not_count_as_activity(tiny_folder):
    async with Verifier(daemon_config(tiny_folder, idle_timeout_s=1.5)) as v:
        ws = await connect(v.url, compression=None, ping_interval=None)
        await ws.send(enc({"type": "hello", "protocol": 1, "tokenizer": FINGERPRINT}))
        welcome = m.decode_server(await ws.recv())
        assert welcome.limits.idle_timeout_s == 1.5
        pongs = 0

        async def ping_every_quarter_second() -> None:
            nonlocal pongs
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await (await ws.ping())
                    pongs += 1
                    await asyncio.sleep(0.25)

        pinger = asyncio.create_task(ping_every_quarter_second())
        error = m.decode_server(await asyncio.wait_for(ws.recv(), 30))
        assert (error.code, error.fatal) == ("idle_timeout", True)
        await ws.wait_closed()
        pinger.cancel()
        assert ws.close_code == 1000
        assert pongs >= 3, "the pings were answered while the session idled out"


# -- 5. refusals before hello ---------------------------------------------------------------------

async def test_too_many_sessions_arrives_before_hello(tiny_folder):
    async with Verifier(daemon_config(tiny_folder, max_sessions=1)) as v:
        first = await Peer.open(v.url)
        second = await Peer.open(v.url, hello=False)  # has sent nothing at all
        refused = await second.next()
        assert (refused.code, refused.fatal, refused.request) == ("too_many_sessions", True, None)
        await second.ws.wait_closed()
        assert second.ws.close_code == 1013
        await first.ws.close()


# -- 6. fatal errors end the connection promptly ----------------------------------------------------

async def test_after_a_fatal_error_the_connection_ends_without_waiting_behind_queued_frames(tiny_folder):
    async with Verifier(daemon_config(tiny_folder, max_messages_per_second=5)) as v:
        peer = await Peer.open(v.url, max_queue=None)
        junk = enc({"type": "cancel", "request": 5})
        for _ in range(3000):  # far more than the server reads before the limit cuts it off
            await peer.ws.send(junk)
        fatal = None
        while fatal is None:
            msg = await peer.next()
            if msg.fatal:
                fatal = msg
        seen_fatal = time.monotonic()
        await peer.ws.wait_closed()
        ended_after = time.monotonic() - seen_fatal
        assert fatal.code == "rate_limited" and peer.ws.close_code == 1008
        # websockets waits up to 10 s for a closing handshake stuck behind unread frames; the server
        # must not: it discards them and ends the connection (a bound with a wide margin on a busy CPU).
        assert ended_after < 5.0, f"the connection ended {ended_after:.1f} s after the fatal error"


# -- 9. request ids ---------------------------------------------------------------------------------

async def test_a_refused_start_does_not_use_its_id_but_an_accepted_one_does(verifier):
    peer = await Peer.open(verifier.url)
    empty = await peer.ask(enc({"type": "start", "request": 4, "prompt": [], "max_new_tokens": 2}))
    assert (empty.code, empty.request) == ("bad_message", 4)
    too_long = await peer.ask(enc({"type": "start", "request": 4, "prompt": [1] * 600, "max_new_tokens": 2}))
    assert (too_long.code, too_long.request) == ("prompt_too_long", 4)
    assert isinstance(await peer.ask(start(4)), m.Started), "a refused start left the id unused"
    assert isinstance(await peer.ask(enc({"type": "cancel", "request": 4})), m.Cancelled)
    reused = await peer.ask(start(4))
    assert (reused.code, reused.request) == ("bad_message", 4)


# -- 10. numbers, cancels of ended requests, vocab_size --------------------------------------------

async def test_temperature_may_be_an_integer(verifier):
    peer = await Peer.open(verifier.url)
    assert isinstance(await peer.ask(start(sampling={"temperature": 1, "top_p": 1})), m.Started)


async def test_a_cancel_for_an_ended_request_is_ignored_silently(verifier):
    peer = await Peer.open(verifier.url)
    assert isinstance(await peer.ask(start(0)), m.Started)
    assert (await peer.ask(draft([64]))).code == "bad_token"  # ended by an error naming it
    assert isinstance(await peer.ask(start(1)), m.Started)
    assert isinstance(await peer.ask(enc({"type": "cancel", "request": 1})), m.Cancelled)
    for request in (0, 1, 1):  # error-ended, cancelled, cancelled again: no answer to any
        await peer.send(enc({"type": "cancel", "request": request}))
    assert isinstance(await peer.ask(start(2)), m.Started), "the next answer is the next start's"


async def test_vocab_size_is_the_embedding_size_and_ids_beyond_the_tokenizer_are_valid(tmp_path):
    tiny_llama(1, vocab_size=72).save_pretrained(tmp_path)
    tokenizer = tiny_tokenizer(66)
    tokenizer.save_pretrained(tmp_path)
    assert len(tokenizer) == 66
    async with Verifier(daemon_config(tmp_path)) as v:
        peer = await Peer.open(v.url, hello=False)
        await peer.send(enc({"type": "hello", "protocol": 1, "tokenizer": tokenizer_fingerprint(tokenizer)}))
        welcome = await peer.next()
        assert welcome.vocab_size == 72
        assert welcome.limits.max_support <= welcome.vocab_size
        assert isinstance(await peer.ask(start(prompt=[1, 70])), m.Started), "id 70 has no string but is valid"
        assert isinstance(await peer.ask(enc({"type": "cancel", "request": 0})), m.Cancelled)
        assert (await peer.ask(start(1, prompt=[1, 72]))).code == "bad_token"
