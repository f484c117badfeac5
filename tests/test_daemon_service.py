"""The verifier as a service: auth, /healthz and /metrics, limits, sd_notify, SIGTERM drain, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec
import pytest
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus

import specd.daemon.client_auth as client_auth
from specd.daemon.client_keys import key_digest
from specd.daemon.notify import Notifier
from specd.daemon.server import Verifier
from specd.shared import messages as m
from specd.shared.errors import ConfigError
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.protocol import ServerFailed
from tests.daemon_support import Client, daemon_config, eventually
from tests.tiny_models import save_tiny_model, tiny_tokenizer

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)
FINGERPRINT = tokenizer_fingerprint(tiny_tokenizer())
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)


def http_get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


async def get(url: str) -> tuple[int, str, str]:
    return await asyncio.to_thread(http_get, url)


async def test_a_missing_or_wrong_key_gets_401_before_any_model_work(tiny_folder, monkeypatch):
    compared = []
    real = client_auth.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(client_auth.hmac, "compare_digest", spy)
    async with Verifier(daemon_config(tiny_folder), api_key="s3cret-key") as v:
        for key in (None, "wrong", "s3cret-key-but-longer"):
            with pytest.raises(InvalidStatus) as info:
                await Client.open(v.url, FINGERPRINT, api_key=key)
            assert info.value.response.status_code == 401
            assert info.value.response.headers["WWW-Authenticate"].startswith("Bearer")
        assert not v.target.forward_positions and v.sessions == 0
        assert not compared  # wrong keys are not found by their hash: nothing is compared with the key
        client = await Client.open(v.url, FINGERPRINT, api_key="s3cret-key")
        assert client.session.welcome is not None
        assert compared == [(key_digest("s3cret-key"), key_digest("s3cret-key"))]  # digests, in constant time
        await client.close()
        status, _type, _body = await get(f"http://127.0.0.1:{v.port}/healthz")  # health needs no key
        assert status == 200
        _s, _t, metrics = await get(f"http://127.0.0.1:{v.port}/metrics")
        assert 'specd_refusals_total{reason="unauthorized"} 3' in metrics


async def test_a_public_address_without_a_key_refuses_to_start(tiny_folder):
    cfg = daemon_config(tiny_folder)
    public = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, host="0.0.0.0"))
    with pytest.raises(ConfigError, match="insecure-no-auth"):
        await Verifier(public).start()


async def test_tls_serves_wss(tiny_folder, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cfg = daemon_config(tiny_folder)
    cfg = msgspec.structs.replace(cfg, server=msgspec.structs.replace(
        cfg.server, tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem")))
    async with Verifier(cfg) as v:
        assert v.url.startswith("wss://127.0.0.1:")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        client = await Client.open(v.url, FINGERPRINT, ssl=context)
        assert client.session.welcome is not None
        await client.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # an untrusted certificate is refused
            await Client.open(v.url, FINGERPRINT, ssl=ssl.create_default_context())


def test_help_documents_every_flag():
    result = run_cli("--help")
    for flag in ("--host", "--port", "--model", "--device", "--dtype", "--max-sessions", "--max-input-tokens",
                 "--max-total-tokens", "--max-draft", "--max-frame-bytes", "--idle-timeout", "--config",
                 "--api-key-file", "--tls-cert", "--tls-key", "--insecure-no-auth", "--log-level", "--threads",
                 "--port-file", "--keys-file"):
        assert flag in result.stdout
    assert result.returncode == 0


async def test_healthz_and_metrics(tiny_folder):
    began = time.monotonic()
    async with Verifier(daemon_config(tiny_folder)) as v:
        base = f"http://127.0.0.1:{v.port}"
        client = await Client.open(v.url, FINGERPRINT)
        await client.start([1, 4, 5], 6, sampling=m.Sampling(temperature=0.0))
        while not client.session.finished:
            await client.round([6, 7])
        status, content_type, body = await get(base + "/healthz")
        health = json.loads(body)
        assert status == 200 and content_type == "application/json"
        assert health["ready"] is True and health["sessions"] == 1 and health["device"] == "cpu"
        assert health["model"] == Path(tiny_folder).name
        # Counted from the verifier's start, which came after `began` (0.001: the figure is rounded to ms).
        assert 0 < health["uptime"] <= time.monotonic() - began + 0.001
        status, content_type, metrics = await get(base + "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        lines = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))
        assert int(lines["specd_rounds_total"]) >= 3 and lines["specd_sessions"] == "1"
        drafted, accepted = int(lines["specd_drafted_tokens_total"]), int(lines["specd_accepted_tokens_total"])
        judged = drafted - int(lines["specd_unverified_drafts_total"])  # the goodput budget may verify a prefix
        assert drafted >= 6 and float(lines["specd_acceptance_rate"]) == pytest.approx(accepted / judged, abs=1e-6)
        assert int(lines["specd_forward_seconds_count"]) == int(lines["specd_rounds_total"])
        assert lines['specd_forward_seconds_bucket{le="+Inf"}'] == lines["specd_forward_seconds_count"]
        assert lines['specd_requests_total{mode="speculative"}'] == "1"
        assert (await get(base + "/nothing-here"))[0] == 404
        await client.close()


async def test_healthz_is_503_while_the_model_loads(tiny_folder, monkeypatch):
    import specd.daemon.target as target_module

    real_load = target_module.TargetModel.load
    loaded = threading.Event()  # the model stays "loading" until the checks below are done

    def slow_load(*args, **kwargs):
        assert loaded.wait(60), "the test never let the model load"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(target_module.TargetModel, "load", staticmethod(slow_load))
    v = Verifier(daemon_config(tiny_folder))
    starting = asyncio.create_task(v.start())
    while v._server is None:
        await asyncio.sleep(0.02)
    status, _t, body = await get(f"http://127.0.0.1:{v.port}/healthz")
    assert status == 503 and json.loads(body)["ready"] is False
    with pytest.raises(InvalidStatus) as info:
        await Client.open(v.url, FINGERPRINT)
    assert info.value.response.status_code == 503
    loaded.set()
    await starting
    assert (await get(f"http://127.0.0.1:{v.port}/healthz"))[0] == 200
    await v.stop()


async def test_each_limit_is_refused_with_a_protocol_error(tiny_folder):
    cfg = daemon_config(tiny_folder, max_sessions=2, max_input_tokens=8, max_total_tokens=16, max_draft=3,
                        max_frame_bytes=4096)
    async with Verifier(cfg) as v:
        client = await Client.open(v.url, FINGERPRINT)
        other = await Client.open(v.url, FINGERPRINT)
        third = await Client.open(v.url, FINGERPRINT, hello=False)
        refused = await third.message()
        assert (refused.code, refused.fatal) == ("too_many_sessions", True)
        await third.ws.wait_closed()
        assert third.ws.close_code == 1013
        await other.close()

        async def error_of(frame: bytes) -> m.Error:
            await client.ws.send(frame)
            (event,) = await client.events()
            assert isinstance(event, ServerFailed), event
            return event.error

        error = await error_of(client.session.start(list(range(1, 10)), max_new_tokens=4))
        assert error.code == "prompt_too_long" and "max_input_tokens 8" in error.message and not error.fatal
        error = await error_of(client.session.start([1, 2, 3], max_new_tokens=4, stop=[64]))
        assert error.code == "bad_token"
        await client.start([1, 5, 6], 100, sampling=m.Sampling(temperature=0.0))
        error = await error_of(client.session.draft([5, 6, 7, 8])[1])
        assert error.code == "draft_too_long" and "1..3" in error.message
        await client.start([1, 4, 5, 7, 8, 9, 10, 11], 100, sampling=m.Sampling(temperature=0.0))
        finish = None
        while finish is None:  # the total limit ends generation with reason "context"...
            verdict = await client.round([3, 3, 3][: max(1, min(3, 16 - len(client.session.committed) - 1))])
            finish = verdict.verdict.reason
        assert finish == "context" and len(client.session.committed) == 16
        await client.start([1, 4, 5, 7, 8, 9, 10, 11], 100, sampling=m.Sampling(temperature=0.0))
        while len(client.session.committed) < 14:
            await client.round([3])
        error = await error_of(client.session.draft([3, 3, 3])[1])  # ...and drafts beyond it are refused
        assert error.code == "context_full"
        await client.ws.send(m.encode(m.Hello(protocol=1, tokenizer="x" * 5000)))  # over max_frame_bytes
        await client.ws.wait_closed()
        assert client.ws.close_code == 1009


async def test_idle_sessions_are_closed_and_freed(tiny_folder):
    async with Verifier(daemon_config(tiny_folder, idle_timeout_s=0.5)) as v:
        client = await Client.open(v.url, FINGERPRINT)
        await client.start([1, 5, 6, 7], 2, sampling=m.Sampling(temperature=0.0))
        driver = next(iter(v.drivers))
        assert driver.kv.tokens and v.engine.open_sessions == 1
        (event,) = await client.events(timeout=5)
        assert isinstance(event, ServerFailed) and event.error.code == "idle_timeout"
        await client.ws.wait_closed()
        assert client.ws.close_code == 1000
        await eventually(lambda: not v.drivers, "the idle connection is dropped")
        assert v.sessions == 0 and driver.kv.closed and v.engine.open_sessions == 0  # its KV slot is free


async def test_stop_finishes_the_round_in_flight_then_closes_with_1001(tiny_folder):
    v = Verifier(daemon_config(tiny_folder))
    await v.start()
    backend = v.engine.backend
    original = backend.forward
    entered, release = threading.Event(), threading.Event()

    def held_forward(*args, **kwargs):  # the round's forward stays in flight until the stop has begun
        entered.set()
        assert release.wait(60), "the test never released the forward"
        return original(*args, **kwargs)

    target = v.target  # stop() lets go of it
    client = await Client.open(v.url, FINGERPRINT)
    idle = await Client.open(v.url, FINGERPRINT)
    await client.start([1, 5, 6], 10, sampling=m.Sampling(temperature=0.0))
    forwards = len(target.forward_positions)
    backend.forward = held_forward
    _rnd, frame = client.session.draft([7, 8])
    await client.ws.send(frame)
    assert await asyncio.to_thread(entered.wait, 30), "the round's forward did not start"
    stopping = asyncio.create_task(v.stop())
    await asyncio.sleep(0)  # let the stop begin while the forward is held
    release.set()
    (verdict,) = await client.events()
    assert verdict.verdict.position == 3  # the round in flight was answered
    (event,) = await client.events()
    assert isinstance(event, ServerFailed) and event.error.code == "shutting_down" and event.error.fatal
    (idle_event,) = await idle.events()
    assert idle_event.error.code == "shutting_down"
    await asyncio.wait_for(stopping, 60)  # a hang guard: stopping waits for nothing but that round
    assert len(target.forward_positions) == forwards + 1, "work was started after the stop began"
    for c in (client, idle):
        await c.ws.wait_closed()
        assert c.ws.close_code == 1001
    with pytest.raises((OSError, InvalidStatus, ConnectionClosed)):
        await Client.open(v.url, FINGERPRINT)


def notify_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path if not path.startswith("@") else "\0" + path[1:])
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.mark.parametrize("kind", ["environment", "abstract"])
async def test_sd_notify_messages(tiny_folder, monkeypatch, kind):
    folder = tempfile.mkdtemp(prefix="specd-n-")  # AF_UNIX paths are short
    path = os.path.join(folder, "notify.sock") if kind == "environment" else f"@specd-test-{os.getpid()}"
    sock = notify_socket(path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if kind == "environment":  # the daemon's way: $NOTIFY_SOCKET (systemd-python when installed)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        notifier = Notifier()
    else:  # the built-in sender, abstract socket
        notifier = Notifier(socket_path=path)
    try:
        v = Verifier(daemon_config(tiny_folder), notifier=notifier)
        await v.start()
        client = await Client.open(v.url, FINGERPRINT)
        lines: list[str] = []

        def serving_one_session() -> bool:
            return any(line.startswith("STATUS=serving") and line.endswith(": 1 session") for line in lines)

        # Wait for the messages themselves (the watchdog pings every 100 ms), not for a fixed time.
        for _ in range(1500):
            lines += [line for message in drain(sock) for line in message.splitlines()]
            if lines.count("WATCHDOG=1") >= 2 and serving_one_session():
                break
            await asyncio.sleep(0.02)
        await client.close()
        await v.stop()
        lines += [line for message in drain(sock) for line in message.splitlines()]
    finally:
        sock.close()
        if kind == "environment":
            os.unlink(path)
        os.rmdir(folder)
    assert any(line.startswith("EXTEND_TIMEOUT_USEC=") for line in lines)
    assert "STATUS=loading " + str(tiny_folder) in lines
    ready = lines.index("READY=1")
    assert lines.count("WATCHDOG=1") >= 2
    assert any(line.startswith("STATUS=serving") and line.endswith(": 1 session") for line in lines[ready:])
    assert "STOPPING=1" in lines[ready:]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specd.daemon", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "SPECD_CONFIG": os.devnull, **(env or {})})


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "port"),
    (["--device", "tpu"], "device"),
    (["--max-total-tokens", "0"], "--max-total-tokens 0: expected `int` >= 1"),
    (["--config", "/does/not/exist.toml"], "does not exist"),
    (["--host", "0.0.0.0", "--port", "0"], "--insecure-no-auth"),
    (["--tls-cert", "/nope.pem", "--tls-key", "/nope.key", "--port", "0"], "does not exist"),
])
def test_cli_errors_are_one_line_and_exit_2(tiny_folder, args, message):
    result = run_cli("--model", str(tiny_folder), *args, env={"SPECD_API_KEY": ""})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr


def test_sigterm_drains_and_exits_0(tiny_folder, tmp_path):
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, "-m", "specd.daemon", "--model", str(tiny_folder), "--port", "0",
                             "--port-file", str(port_file), "--device", "cpu", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SPECD_CONFIG": os.devnull, "NOTIFY_SOCKET": ""})
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        url = f"ws://127.0.0.1:{int(port_file.read_text())}"

        async def scenario() -> int | None:
            client = await Client.open(url, FINGERPRINT)
            await client.start([1, 5, 6], 4, sampling=m.Sampling(temperature=0.0))
            proc.send_signal(signal.SIGTERM)
            (event,) = await client.events()
            assert event.error.code == "shutting_down"
            await client.ws.wait_closed()
            return client.ws.close_code

        assert asyncio.run(scenario()) == 1001
        assert proc.wait(timeout=20) == 0
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr and "stopped" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
