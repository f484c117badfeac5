"""A running verifier under abuse: bad input, floods, non-reading clients; other sessions keep working.

Every test runs a real ``Verifier`` on 127.0.0.1 with a tiny model. Each bad frame must get its
protocol error code (docs/protocol.md §7) or a clean close, and a well-behaved session running at the
same time must get exactly the answer it would get alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
import time
from dataclasses import dataclass

import msgspec
import pytest
import torch
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import specd.daemon.connection as connection_module
import specd.daemon.server as server_module
from specd.daemon.server import Verifier
from specd.shared import messages as m
from specd.shared.errors import ConfigError
from tests.daemon_support import Client, daemon_config, eventually, greedy_reference
from tests.raw_frames import FINGERPRINT, GREEDY, PROMPT, SAMPLED, draft, enc, start
from tests.tiny_models import save_tiny_model, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)


def proposal(tokens: list[int], probs_per_row: list[float], ids_per_row: list[int] | None = None) -> dict:
    """A proposal whose rows all hold ``probs_per_row`` over the draft and the ids after it."""
    k = len(probs_per_row)
    ids: list[int] = []
    for t in tokens:
        ids += ids_per_row if ids_per_row is not None else [t, *((t + 1 + j) % 64 for j in range(k - 1))]
    probs = probs_per_row * len(tokens)
    return {"support": k, "q_ids": struct.pack(f"<{len(ids)}i", *ids),
            "q_probs": struct.pack(f"<{len(probs)}f", *probs)}


@dataclass(frozen=True)
class Case:
    name: str
    frames: list[bytes | str]  # sent after hello (and ``setup``); the last one is the bad one
    expect: str  # an error code, "discarded", or "close:<code>" for a closed connection
    setup: list[bytes] = ()  # type: ignore[assignment]
    hello: bool = True


def valid_draft() -> bytes:
    return draft([7])


CASES = [
    Case("text frame", ["hello as text"], "bad_frame"),
    Case("garbage binary", [b"\xc1\xff\x00garbage"], "bad_frame"),
    Case("truncated frame", [valid_draft()[:-3]], "bad_frame", setup=[start()]),
    Case("deep nesting", [b"\x91" * 200_000 + b"\xc0"], "bad_frame"),
    Case("deep nesting skipped before the type", [b"\x82\xa1x" + b"\x91" * 200_000 + b"\xc0\xa4type\xa5hello"],
         "bad_frame"),
    Case("string not UTF-8", [b"\x81\xa4type\xa5\x00\x00\x00\x00\x80"], "bad_frame"),
    Case("a server message", [enc({"type": "verdict", "request": 0})], "bad_frame"),
    Case("unknown field", [draft([7], extra=1)], "bad_message", setup=[start()]),
    Case("field of the wrong type", [draft("seven")], "bad_message", setup=[start()]),  # type: ignore[arg-type]
    Case("negative token id", [draft([-1])], "bad_message", setup=[start()]),
    Case("token id beyond int32", [draft([2**40])], "bad_message", setup=[start()]),
    Case("negative round", [draft([7], round_=-1)], "bad_message", setup=[start()]),
    Case("token id outside the vocabulary", [draft([64])], "bad_token", setup=[start()]),
    Case("gamma zero", [draft([])], "draft_too_long", setup=[start()]),
    Case("gamma huge", [draft([7] * 10_000)], "draft_too_long", setup=[start()]),
    Case("wrong position", [draft([7], position=5)], "discarded", setup=[start()]),
    Case("position far ahead", [draft([7], position=2**63)], "discarded", setup=[start()]),
    Case("wrong parent", [draft([7], parent=9)], "discarded", setup=[start()]),
    Case("round not increasing", [draft([7], round_=5), draft([8], round_=5, position=5)], "unexpected_message",
         setup=[start()]),
    Case("unknown request", [draft([7], request=99)], "unknown_request", setup=[start()]),
    Case("second hello", [enc({"type": "hello", "protocol": 1, "tokenizer": FINGERPRINT})], "unexpected_message"),
    Case("start while active", [start(1)], "request_active", setup=[start()]),
    Case("reused request id", [enc({"type": "cancel", "request": 0}), start(0)], "bad_message",
         setup=[start()]),
    Case("empty prompt", [enc({"type": "start", "request": 0, "prompt": [], "max_new_tokens": 4})],
         "bad_message"),
    Case("prompt too long", [enc({"type": "start", "request": 0, "prompt": [1] * 600, "max_new_tokens": 4})],
         "prompt_too_long"),
    Case("prompt outside the vocabulary", [enc({"type": "start", "request": 0, "prompt": [1, 99],
                                                "max_new_tokens": 4})], "bad_token"),
    Case("max_new_tokens zero", [start(max_new_tokens=0)], "bad_message"),
    Case("temperature NaN", [start(sampling={"temperature": math.nan})], "bad_message"),
    Case("temperature infinite", [start(sampling={"temperature": math.inf})], "bad_message"),
    Case("top_p zero", [start(sampling={"top_p": 0.0})], "bad_message"),
    Case("draft in cloud mode", [valid_draft()], "wrong_mode", setup=[start(mode="cloud", max_new_tokens=400)]),
    Case("sampled round without a proposal", [valid_draft()], "bad_proposal", setup=[start(sampling=SAMPLED)]),
    Case("NaN probability", [draft([7], **proposal([7], [math.nan, 0.5]))], "bad_proposal",
         setup=[start(sampling=SAMPLED)]),
    Case("infinite probability", [draft([7], **proposal([7], [math.inf, 0.0]))], "bad_proposal",
         setup=[start(sampling=SAMPLED)]),
    Case("negative probability", [draft([7], **proposal([7], [1.5, -0.5]))], "bad_proposal",
         setup=[start(sampling=SAMPLED)]),
    Case("probabilities not summing to 1", [draft([7], **proposal([7], [0.3, 0.3]))], "bad_proposal",
         setup=[start(sampling=SAMPLED)]),
    Case("support above max_support", [draft([7], **proposal([7], [1 / 65] * 65))], "bad_proposal",
         setup=[start(sampling=SAMPLED)]),
    Case("proposal ids outside the vocabulary", [draft([7], **proposal([7], [0.5, 0.5], [7, 640]))],
         "bad_proposal", setup=[start(sampling=SAMPLED)]),
    Case("proposal repeats an id", [draft([7], **proposal([7], [0.5, 0.5], [7, 7]))], "bad_proposal",
         setup=[start(sampling=SAMPLED)]),
    Case("draft outside its own support", [draft([7], **proposal([7], [0.5, 0.5], [8, 9]))], "bad_proposal",
         setup=[start(sampling=SAMPLED)]),
    Case("proposal bytes of the wrong size", [draft([7], support=2, q_ids=b"\0" * 7, q_probs=b"\0" * 8)],
         "bad_proposal", setup=[start(sampling=SAMPLED)]),
    Case("drafts beyond the context", [draft([7, 7], position=511, parent=1)], "context_full",
         setup=[enc({"type": "start", "request": 0, "prompt": [1] * 511, "max_new_tokens": 9,
                     "sampling": GREEDY})]),
    Case("cancel of an unknown request", [enc({"type": "cancel", "request": 42})], "unknown_request"),
    Case("oversized frame", [b"\0" * (2 * 1024 * 1024)], "close:1009"),
    Case("garbage before hello", [b"\x00\x01"], "close:1002", hello=False),
    Case("draft before hello", [valid_draft()], "close:1002", hello=False),
    Case("unsupported protocol version", [enc({"type": "hello", "protocol": 2, "tokenizer": FINGERPRINT})],
         "close:1008", hello=False),
    Case("another tokenizer", [enc({"type": "hello", "protocol": 1, "tokenizer": "sha256:00"})], "close:1008",
         hello=False),
]


async def _reply(ws, timeout: float = 30.0) -> m.ServerMessage:
    """The next server message that is not a streamed ``tokens`` (a cloud stream may run alongside)."""
    while True:
        msg = m.decode_server(await asyncio.wait_for(ws.recv(), timeout))
        if not isinstance(msg, m.Tokens):
            return msg


async def run_case(url: str, case: Case) -> None:
    """Send the case's frames; check the answer; check a non-fatal session still answers."""
    async with connect(url, compression=None, max_size=None) as ws:
        if case.hello:
            await ws.send(m.encode(m.Hello(protocol=1, tokenizer=FINGERPRINT)))
            assert isinstance(await _reply(ws), m.Welcome)
        for frame in case.setup:
            await ws.send(frame)
            reply = await _reply(ws)
            assert isinstance(reply, m.Started), (case.name, reply)
        for frame in case.frames[:-1]:
            await ws.send(frame)
            await _reply(ws)
        await ws.send(case.frames[-1])
        if case.expect.startswith("close:"):
            with pytest.raises(ConnectionClosed):
                while True:  # a fatal error (if any) comes first, then the close
                    reply = await _reply(ws)
                    assert isinstance(reply, m.Error) and reply.fatal, (case.name, reply)
            assert ws.close_code == int(case.expect.split(":")[1]), (case.name, ws.close_code)
            return
        reply = await _reply(ws)
        if case.expect == "discarded":
            assert isinstance(reply, m.Discarded), (case.name, reply)
        else:
            assert isinstance(reply, m.Error), (case.name, reply)
            assert (reply.code, reply.fatal) == (case.expect, False), (case.name, reply)
            assert len(reply.message) < 1000, "errors never echo large input back"
        # The session survives: a stray hello is refused without closing, and a new request works.
        await ws.send(m.encode(m.Hello(protocol=1, tokenizer=FINGERPRINT)))
        assert (await _reply(ws)).code == "unexpected_message", case.name
        await ws.send(enc({"type": "cancel", "request": 0}))  # ends request 0 if it still runs
        request = await start_when_free(ws, case.name)
        await ws.send(draft([7, 8], request=request))
        verdict = await _reply(ws)
        assert isinstance(verdict, m.Verdict) and verdict.position == 3, (case.name, verdict)


async def start_when_free(ws, name: str) -> int:
    """Start a new greedy request, retrying while a cancelled cloud stream finishes its step."""
    for request in range(777, 877):
        await ws.send(enc({"type": "start", "request": request, "prompt": PROMPT, "max_new_tokens": 5,
                           "sampling": GREEDY}))
        while True:  # skip the cancel's answer (cancelled, or unknown_request for request 0)
            reply = await _reply(ws)
            if isinstance(reply, m.Started):
                return request
            if isinstance(reply, m.Error) and reply.request == request:
                assert reply.code == "request_active", (name, reply)
                break
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name}: the session never became free")


async def test_every_bad_input_gets_its_error_and_a_concurrent_session_is_unaffected(tiny_folder):
    model = tiny_llama(1)
    prompt = [1, 33, 34, 35]
    expected = greedy_reference(model, prompt, 24, [2])
    async with Verifier(daemon_config(tiny_folder)) as v:
        done = asyncio.Event()

        async def well_behaved() -> int:
            good = await Client.open(v.url, FINGERPRINT)
            answers = 0
            while not done.is_set() or answers == 0:
                await good.start(prompt, 24, sampling=m.Sampling(temperature=0.0), mode="cloud")
                assert await good.stream_all() == expected
                answers += 1
            await good.close()
            return answers

        async def abuse() -> None:
            try:
                for case in CASES:
                    await run_case(v.url, case)
            finally:
                done.set()

        answers, _ = await asyncio.gather(well_behaved(), abuse())
        assert answers >= 1
        health = v.health()
        assert health["ready"] and v.target is not None
        await eventually(lambda: v.sessions == 0, "every abusive connection is gone and its slot free")


async def test_a_flooding_connection_is_rate_limited_and_others_keep_working(tiny_folder):
    async with Verifier(daemon_config(tiny_folder, max_messages_per_second=20)) as v:
        good = await Client.open(v.url, FINGERPRINT)
        flood = await Client.open(v.url, FINGERPRINT)
        assert flood.session.welcome.limits.max_messages_per_second == 20
        codes = []

        async def send_flood() -> None:
            with contextlib.suppress(ConnectionClosed):
                for _ in range(1000):  # until cut; paced so the server keeps up (unread frames delay the close)
                    await flood.ws.send(enc({"type": "cancel", "request": 5}))
                    await asyncio.sleep(0.002)

        sender = asyncio.create_task(send_flood())
        with pytest.raises(ConnectionClosed):
            while True:
                codes.append((await flood.message()).code)
        await sender
        assert codes[-1] == "rate_limited" and flood.ws.close_code == 1008
        assert set(codes[:-1]) == {"unknown_request"} and len(codes) - 1 >= 40  # the burst (2 × rate), then the cut
        await good.start(PROMPT, 8, sampling=m.Sampling(temperature=0.0))
        assert (await good.round([7, 8])).verdict.position == 3
        await good.close()


async def test_a_client_that_stops_reading_stalls_only_itself_and_is_dropped(tiny_folder, monkeypatch):
    """Backpressure: the verifier's send to a non-reading client waits on that connection only."""
    monkeypatch.setattr(connection_module, "SEND_TIMEOUT_S", 8.0)  # 30 s by default
    async with Verifier(daemon_config(tiny_folder)) as v:
        stuck = await connect(v.url, compression=None, max_size=None, max_queue=1, ping_interval=None)
        stuck.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        await stuck.send(m.encode(m.Hello(protocol=1, tokenizer=FINGERPRINT)))
        assert isinstance(await _reply(stuck), m.Welcome)
        (driver,) = v.drivers
        driver.ws.transport.set_write_buffer_limits(high=512)  # a full pipe, reached quickly
        driver.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # A long cloud stream to a client that never reads again, plus error replies it never reads.
        await stuck.send(enc({"type": "start", "request": 0, "prompt": PROMPT, "max_new_tokens": 500,
                              "sampling": GREEDY, "mode": "cloud"}))
        for _ in range(50):
            await stuck.send(enc({"type": "hello", "protocol": 1, "tokenizer": "x" * 200}))
        good = await Client.open(v.url, FINGERPRINT)
        stalled = False
        for _ in range(8):
            await good.start(PROMPT, 6, sampling=m.Sampling(temperature=0.0))
            while not good.session.finished:
                await good.round([7, 8, 9])
                # Had the round waited on the stalled client, that client would be gone by now: it is
                # dropped only after its send has waited SEND_TIMEOUT_S.
                assert driver in v.drivers and v.metrics.refusals["send_timeout"] == 0, \
                    "a round waited on the stalled client"
            stalled = stalled or driver.ws.transport.get_write_buffer_size() > 0
        assert stalled, "the test did not reach backpressure"
        # A send that waits longer than SEND_TIMEOUT_S drops the stalled client and frees its slot.
        deadline = time.monotonic() + 30
        while driver in v.drivers and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert driver not in v.drivers and v.sessions == 1
        assert driver.kv.closed and v.engine.open_sessions == 1, "its KV slot was freed"
        assert v.metrics.refusals["send_timeout"] == 1
        await good.close()
        stuck.transport.abort()


async def test_max_sessions_refuses_clearly_and_frees_the_slot(tiny_folder):
    async with Verifier(daemon_config(tiny_folder, max_sessions=2)) as v:
        first = await Client.open(v.url, FINGERPRINT)
        second = await Client.open(v.url, FINGERPRINT)
        third = await Client.open(v.url, FINGERPRINT, hello=False)
        refused = await third.message()
        assert (refused.code, refused.fatal) == ("too_many_sessions", True)
        assert "max_sessions = 2" in refused.message
        await third.ws.wait_closed()
        assert third.ws.close_code == 1013
        await first.close()
        await eventually(lambda: v.sessions < 2, "the closed session's slot is free")
        again = await Client.open(v.url, FINGERPRINT)  # the slot is free again
        assert again.session.welcome is not None
        await second.start(PROMPT, 4, sampling=m.Sampling(temperature=0.0))
        assert (await second.round([7])).verdict.position == 3
        await again.close()
        await second.close()


async def test_kv_cache_stays_within_max_total_tokens(tiny_folder):
    async with Verifier(daemon_config(tiny_folder, max_input_tokens=8, max_total_tokens=24)) as v:
        client = await Client.open(v.url, FINGERPRINT)
        (driver,) = v.drivers
        sizes = []
        for request in range(3):
            await client.start([1, 5, 6, 17, 18][: 3 + request], 100, sampling=m.Sampling(temperature=0.0))
            while not client.session.finished:
                room = 24 - len(client.session.committed)
                await client.round([3] * max(1, min(4, room)))
                sizes.append(len(driver.kv.tokens))
            assert client.session.reason == "context" and len(client.session.committed) == 24
        assert max(sizes) <= 24
        assert v.engine.backend.cache.slot_len == 24  # each session's KV slot holds max_total_tokens positions
        await client.close()


@pytest.mark.parametrize("headers", [
    [("Authorization", "Bearer right-key"), ("Authorization", "Bearer right-key")],
    [("Authorization", "Bearer right-key"), ("Authorization", "Bearer wrong")],
    [("Authorization", "bearer right-key ")],
    [("Authorization", "Basic cmlnaHQta2V5Og==")],
    [("X-Api-Key", "right-key")],
])
async def test_odd_authorization_headers_get_401_before_model_work(tiny_folder, headers):
    async with Verifier(daemon_config(tiny_folder), api_key="right-key") as v:
        with pytest.raises(InvalidStatus) as info:
            await connect(v.url, additional_headers=headers, compression=None)
        assert info.value.response.status_code == 401
        assert not v.target.forward_positions and v.sessions == 0


async def test_insecure_no_auth_allows_listening_beyond_loopback(tiny_folder):
    cfg = load_public(tiny_folder)
    async with Verifier(cfg) as v:
        client = await Client.open(f"ws://127.0.0.1:{v.port}", FINGERPRINT)
        assert client.session.welcome is not None
        await client.close()


def load_public(folder) -> object:
    cfg = daemon_config(folder)
    return msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, host="0.0.0.0",
                                                                       insecure_no_auth=True))



async def test_the_edge_client_says_the_verifier_is_full_and_may_retry(tiny_folder):
    from specd.desktop.client.connection import ConnectionFailed, Endpoint
    from specd.desktop.client.edge_client import EdgeClient

    async with Verifier(daemon_config(tiny_folder, max_sessions=1)) as v:
        holder = await Client.open(v.url, FINGERPRINT)
        edge = EdgeClient(Endpoint(v.url, open_timeout=5), tokenizer=tiny_tokenizer(), fingerprint=FINGERPRINT)
        with pytest.raises(ConnectionFailed) as info:
            await edge.connect()
        assert "the verifier refused this client" in str(info.value) and "max_sessions = 1" in str(info.value)
        assert info.value.retry, "a full verifier is worth retrying (close 1013: try again later)"
        await holder.close()
        await eventually(lambda: v.sessions == 0, "the holder's slot is free")
        welcome = await edge.connect()
        assert welcome.vocab_size == 64
        await edge.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.7", "verifier.example.com"])
async def test_listening_beyond_loopback_without_a_key_is_refused_before_binding(tiny_folder, host):
    cfg = daemon_config(tiny_folder)
    public = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, host=host))
    with pytest.raises(ConfigError, match=r"without an API key.*--insecure-no-auth"):
        await Verifier(public).start()


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.4.5.6", True), ("::1", True),
                                           ("localhost", True), ("0.0.0.0", False), ("::", False),
                                           ("", False), ("10.0.0.1", False), ("example.com", False)])
def test_what_counts_as_loopback(host, loopback):
    assert server_module.is_loopback(host) is loopback


async def test_idle_and_malformed_http_connections_cost_little_and_are_dropped(tiny_folder, monkeypatch):
    """Sockets that never finish the upgrade (slowloris), oversized or garbage HTTP: the verifier stays up."""
    real_serve = server_module.serve

    def quick_handshake(*args, **kwargs):
        kwargs.setdefault("open_timeout", 1.0)  # websockets' default is 10 s
        return real_serve(*args, **kwargs)

    monkeypatch.setattr(server_module, "serve", quick_handshake)
    async with Verifier(daemon_config(tiny_folder), api_key="k") as v:
        idle = [await asyncio.open_connection("127.0.0.1", v.port) for _ in range(50)]
        partial_reader, partial = await asyncio.open_connection("127.0.0.1", v.port)
        partial.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
        answers = []
        for request in (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
                        b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n",
                        b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", v.port)
            writer.write(request)
            answers.append(await asyncio.wait_for(reader.read(200), 10))
            writer.close()
        for answer in answers:  # an HTTP error or a plain close, never a session
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer
        client = await Client.open(v.url, FINGERPRINT, api_key="k")  # a real client is served meanwhile
        await client.start(PROMPT, 4, sampling=m.Sampling(temperature=0.0))
        assert (await client.round([7])).verdict.position == 3
        await client.close()
        for reader, writer in [*idle, (partial_reader, partial)]:  # dropped after the handshake timeout
            data = await asyncio.wait_for(reader.read(200), 10)
            assert data == b"" or data.startswith(b"HTTP/1.1 4"), data
            writer.close()
        assert v.metrics.sessions_total == 1, "only the real client became a session"
