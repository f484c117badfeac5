"""The delaying TCP proxy: real sockets on loopback, delay both ways, stalls, cuts, refusals."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from specd.desktop.bench.netem import DelayProxy, ThreadedProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes = b"ping") -> float:
    start = time.perf_counter()
    writer.write(payload)
    await writer.drain()
    got = b""
    while len(got) < len(payload):
        chunk = await reader.read(65536)
        assert chunk, "connection closed mid-echo"
        got += chunk
    assert got == payload
    return (time.perf_counter() - start) * 1000.0


@pytest.fixture
async def echo_port():
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_round_trip_carries_the_delay_and_keeps_order(echo_port):
    async with DelayProxy("127.0.0.1", echo_port, rtt_ms=0) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        fast = min([await _ping(reader, writer) for _ in range(3)])
        proxy.rtt_ms = 120
        slow = [await _ping(reader, writer) for _ in range(3)]
        # A delay can only add time, so its lower bound is exact; rtt 0 adds none (relative: the best of
        # three undelayed pings is under half of one delayed ping).
        assert all(s >= 118 for s in slow), slow
        assert fast < min(slow) / 2, (fast, slow)
        # A burst of 1 MB arrives in order and is not serialised by the delay: it is read in at least 16
        # chunks each way, so delaying them one after another would cost >= 16 round trips.
        payload = bytes(range(256)) * 4096
        took = await _ping(reader, writer, payload)
        assert took >= 118 and took < 4 * max(slow), (took, slow)
        assert proxy.bytes_up >= len(payload) and proxy.bytes_down >= len(payload)
        writer.close()


async def test_drop_stalls_both_directions_without_losing_bytes(echo_port):
    async with DelayProxy("127.0.0.1", echo_port, rtt_ms=20) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        before = await _ping(reader, writer)
        proxy.drop(0.3)
        stalled = await _ping(reader, writer, b"after the stall")
        assert stalled >= 290, stalled
        after = await _ping(reader, writer)  # the stall is over: back to the plain delay
        assert 19 <= after < stalled / 2, (before, stalled, after)
        assert proxy.bytes_down == 4 + len(b"after the stall") + 4
        writer.close()


async def test_cut_resets_live_connections_and_refuses_for_a_while(echo_port):
    async with DelayProxy("127.0.0.1", echo_port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        await _ping(reader, writer)
        assert proxy.connections == 1
        proxy.cut(refuse_s=0.5)
        with pytest.raises((ConnectionError, AssertionError)):
            await asyncio.wait_for(_ping(reader, writer), 10.0)
        assert proxy.connections == 0
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await asyncio.wait_for(reader2.read(10), 10.0) == b""  # accepted and closed at once
        assert (proxy.accepted, proxy.connections) == (2, 0)
        await asyncio.sleep(0.6)
        reader3, writer3 = await asyncio.open_connection("127.0.0.1", proxy.port)
        await asyncio.wait_for(_ping(reader3, writer3), 10.0)  # refusing is over: proxied again
        assert (proxy.accepted, proxy.connections) == (3, 1)
        for w in (writer, writer2, writer3):
            w.close()


async def test_websocket_through_the_proxy_sees_the_rtt():
    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with DelayProxy("127.0.0.1", port, rtt_ms=80) as proxy, connect(proxy.url()) as ws:
            start = time.perf_counter()
            await ws.send(b"x" * 1000)
            assert await ws.recv() == b"x" * 1000
            assert (time.perf_counter() - start) * 1000 >= 78


def test_threaded_proxy_from_blocking_code():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with ThreadedProxy("127.0.0.1", port, rtt_ms=100) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port))
        server_side, _ = listener.accept()
        start = time.perf_counter()
        client.sendall(b"hello")
        assert server_side.recv(10) == b"hello"
        server_side.sendall(b"back")
        assert client.recv(10) == b"back"
        assert (time.perf_counter() - start) * 1000 >= 98
        proxy.cut()
        client.settimeout(2.0)
        assert client.recv(10) == b""  # the proxy closed our side
        client.close()
        server_side.close()
    listener.close()
    with pytest.raises(ValueError):
        ThreadedProxy("127.0.0.1", port).rtt_ms = -1
