"""Faults between the edge client and a verifier subprocess: kill -9 and restart, SIGTERM with sessions
in flight, a proxy that stalls and cuts connections. The client must finish every answer with exactly
the tokens of an uninterrupted run: nothing lost, nothing repeated.

The verifier runs as ``python -m specd.daemon`` (a real process to kill); the proxy is
``specd.desktop.bench.netem.DelayProxy``. Greedy answers are compared with transformers' greedy
decoding; seeded cloud sampling is keyed by position (docs/protocol.md §5), so a resumed answer must
also equal the uninterrupted one token for token.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from specd.desktop.bench.netem import DelayProxy
from specd.desktop.client.answer import Answer, Settings
from specd.desktop.client.connection import Endpoint
from specd.desktop.client.edge_client import EdgeClient
from specd.desktop.drafters.torch_drafter import TorchDrafter
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.sampling import SamplingParams
from tests.daemon_process import DaemonProcess
from tests.daemon_support import greedy_reference
from tests.tiny_models import save_tiny_model, tiny_llama

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]
torch.set_num_threads(1)
PROMPT = [1, 33, 34, 35]  # the tiny target does not reach end-of-sequence for 400 tokens
GREEDY = Settings(sampling=SamplingParams(temperature=0.0), max_new_tokens=160, seed=0, gamma_max=6)
SAMPLED = Settings(sampling=SamplingParams(temperature=1.0, top_p=0.95), max_new_tokens=160, seed=7)


@pytest.fixture(scope="module")
def target_folder(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)


@pytest.fixture(scope="module")
def expected() -> list[int]:
    reference = greedy_reference(tiny_llama(1), PROMPT, GREEDY.max_new_tokens, [2])
    assert len(reference) == GREEDY.max_new_tokens
    return reference


@pytest.fixture
def daemon(target_folder, tmp_path):
    process = DaemonProcess(target_folder, tmp_path)
    process.start()
    yield process
    process.stop()


class OfflineSlowDrafter(TorchDrafter):
    """Slow only while the verifier is away, so the restart lands before the answer ends locally."""

    client: EdgeClient | None = None

    def next_logits(self, ahead=()):
        if self.client is not None and not self.client.connected:
            time.sleep(0.1)
        return super().next_logits(ahead)


def make_client(url: str, folder: Path, *, drafter: bool) -> EdgeClient:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    draft = OfflineSlowDrafter(folder, "cpu") if drafter else None  # the draft is the target: local = target
    # Cloud-only answers wait max(5 s, reconnect_max_s) for the verifier: room for a restart under load.
    client = EdgeClient(Endpoint(url=url, open_timeout=5), tokenizer=tokenizer,
                        fingerprint=tokenizer_fingerprint(tokenizer), drafter=draft, on_disconnect="local",
                        reconnect_max_s=1.0 if drafter else 20.0)
    if draft is not None:
        draft.client = client
    return client


def check_stream(answer: Answer) -> None:
    """The streamed pieces carry every token exactly once, in order."""
    assert [t for piece in answer.pieces for t in piece.token_ids] == answer.token_ids


async def answer_with_fault(client: EdgeClient, settings: Settings, after_tokens: int, fault) -> Answer:
    """Generate; call ``fault()`` once when ``after_tokens`` tokens have streamed."""
    fired: list[object] = []

    def on_piece(_piece) -> None:
        run = client._run
        if not fired and run is not None and len(run.committed) - len(PROMPT) >= after_tokens:
            fired.append(fault())

    try:
        answer = await client.generate(list(PROMPT), settings, on_piece)
    finally:
        await client.close()
    assert fired, "the fault never fired: the answer was too short"
    for item in fired:
        if isinstance(item, asyncio.Task):
            await item
    return answer


@pytest.mark.parametrize("drafter", [False, True], ids=["cloud-only", "speculative"])
async def test_kill_9_mid_answer_then_restart_loses_and_repeats_nothing(daemon, expected, target_folder, drafter):
    client = make_client(daemon.url, target_folder, drafter=drafter)
    restarted: list[asyncio.Task] = []

    def kill_and_restart() -> asyncio.Task:
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        restarted.append(asyncio.get_running_loop().create_task(daemon.astart()))  # same port
        return restarted[0]

    answer = await answer_with_fault(client, GREEDY, 20, kill_and_restart)
    assert answer.token_ids == expected
    check_stream(answer)
    assert answer.stats.reconnects >= 1 and answer.finish_reason == "length"
    sources = [piece.source for piece in answer.pieces if piece.token_ids]
    if drafter:  # continued locally while the verifier was down, then speculation resumed
        assert "local" in sources
        last_local = max(i for i, s in enumerate(sources) if s == "local")
        assert set(sources[last_local + 1:]) & {"draft", "target"}, "speculation did not resume"
    else:
        assert set(sources) == {"cloud"}


async def test_seeded_cloud_sampling_resumes_token_for_token_after_kill_9(daemon, target_folder):
    reference = make_client(daemon.url, target_folder, drafter=False)
    try:
        uninterrupted = await reference.generate(list(PROMPT), SAMPLED)
    finally:
        await reference.close()

    def kill_and_restart() -> asyncio.Task:
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        return asyncio.get_running_loop().create_task(daemon.astart())

    resumed = await answer_with_fault(make_client(daemon.url, target_folder, drafter=False), SAMPLED, 30,
                                      kill_and_restart)
    assert resumed.token_ids == uninterrupted.token_ids and resumed.stats.reconnects >= 1
    check_stream(resumed)


@pytest.mark.parametrize("drafter", [False, True], ids=["cloud-only", "speculative"])
async def test_a_proxy_that_stalls_and_cuts_connections_is_survived(daemon, target_folder, drafter):
    expected = greedy_reference(tiny_llama(1), PROMPT, 400, [2])
    async with DelayProxy("127.0.0.1", daemon.port, rtt_ms=10) as proxy:
        client = make_client(proxy.url(), target_folder, drafter=drafter)
        states: list[str] = []
        client.on_status = lambda state, message: states.append(f"{state}: {message}")
        loop = asyncio.get_running_loop()

        def stall_then_cut(refuse_s: float) -> None:
            proxy.drop(1.0)  # bytes in flight are held in the proxy...
            loop.call_later(0.3, lambda: proxy.cut(refuse_s=refuse_s))  # ...and lost with the connection

        faults = {50: lambda: stall_then_cut(0.4),  # reconnections are refused for 0.4 s as well
                  200: lambda: proxy.drop(0.5),  # a stall alone: everything arrives late, in order
                  300: lambda: stall_then_cut(0.0)}
        fired = []

        def on_piece(_piece) -> None:
            run = client._run
            generated = len(run.committed) - len(PROMPT) if run is not None else 0
            for at, fault in faults.items():
                if generated >= at and at not in fired:
                    fired.append(at)
                    fault()

        try:
            answer = await client.generate(list(PROMPT), replace(GREEDY, max_new_tokens=400), on_piece)
        finally:
            await client.close()
    assert fired == [50, 200, 300], (answer.finish_reason, answer.stats.reconnects, len(answer.token_ids), states)
    assert answer.token_ids == expected and answer.finish_reason == "length"
    check_stream(answer)
    assert answer.stats.reconnects >= 1 and proxy.accepted >= 3  # the refused attempts count too


async def test_sigterm_with_sessions_in_flight_then_restart_every_client_resumes(daemon, expected, target_folder):
    clients = [make_client(daemon.url, target_folder, drafter=d) for d in (False, False, True, True)]
    progress = [0] * len(clients)
    restart: list[asyncio.Task] = []

    async def one(i: int, client: EdgeClient) -> Answer:
        def on_piece(_piece) -> None:
            run = client._run
            progress[i] = len(run.committed) - len(PROMPT) if run is not None else progress[i]

        try:
            return await client.generate(list(PROMPT), GREEDY, on_piece)
        finally:
            await client.close()

    async def restart_when_all_started() -> None:
        while min(progress) < 5:
            await asyncio.sleep(0.005)
        daemon.signal(signal.SIGTERM)  # drains: rounds in flight finish, clients get 1001
        assert await asyncio.to_thread(daemon.wait) == 0
        await daemon.astart()

    restart.append(asyncio.create_task(restart_when_all_started()))
    answers = await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))
    await restart[0]
    for answer in answers:
        assert answer.token_ids == expected
        check_stream(answer)
    assert sum(a.stats.reconnects for a in answers) >= 1


def test_the_port_is_reusable_right_after_kill_9(daemon):
    """A restart on the same port must not fail with 'address in use' (TIME_WAIT after a kill)."""
    port = daemon.port
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    assert daemon.start() == port
