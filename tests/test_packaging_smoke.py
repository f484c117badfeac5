"""The verifier bundle works as systemd runs it: build it with PyInstaller (as `make package-daemon`
does), start it on a tiny model with a notify socket this test owns, and see READY=1, a watchdog ping,
/healthz 200, and a clean STOPPING=1 exit on SIGTERM.

Building takes about 2–3 minutes on two cores, so this is marked ``slow``; skip it locally with
``pytest -m "not slow"``, or point ``SPECD_VERIFIER_BUNDLE`` at an existing dist/specd-verifier to test
that bundle without building.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="the verifier bundle is built for Linux servers"),
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    existing = os.environ.get("SPECD_VERIFIER_BUNDLE")
    if existing:
        return Path(existing)
    pytest.importorskip("PyInstaller")
    out = tmp_path_factory.mktemp("bundle")
    env = {**os.environ, "PYTHON": sys.executable, "DISTDIR": str(out / "dist"), "WORKDIR": str(out / "work")}
    build = subprocess.run(["bash", str(ROOT / "packaging/linux/build.sh"), "--no-archive"], env=env,
                           capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-5000:]
    return out / "dist" / "specd-verifier"


def receive(sock: socket.socket, until: str, deadline: float, proc: subprocess.Popen, seen: list[str]) -> None:
    """Collect notify datagrams into ``seen`` until one carries the line ``until``."""
    while not any(until in message.splitlines() for message in seen):
        try:
            seen.append(sock.recv(4096).decode())
            continue
        except TimeoutError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {proc.returncode} before {until}; notifications: {seen}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {until} in time; notifications: {seen}")


def test_the_bundle_starts_like_a_notify_service(bundle, tmp_path):
    program = bundle / "specd-verifier"
    assert program.is_file() and os.access(program, os.X_OK)
    model = save_tiny_model(tmp_path / "target", seed=1)
    # AF_UNIX paths are limited to 108 bytes: keep the socket in a short temporary folder.
    sockdir = Path(tempfile.mkdtemp(prefix="specd-notify-"))
    notify_path = sockdir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(0.5)
    port_file = tmp_path / "port"
    env = {key: value for key, value in os.environ.items()
           if key not in ("JOURNAL_STREAM", "SPECD_API_KEY", "SPECD_CONFIG", "LISTEN_FDS")}
    env.update(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="1000000", HF_HUB_OFFLINE="1",
               CACHE_DIRECTORY=str(tmp_path / "cache"), STATE_DIRECTORY=str(tmp_path / "state"))
    command = [str(program), "--model", str(model), "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(port_file), "--device", "cpu", "--log-level", "info"]
    log = (tmp_path / "daemon.log").open("w+")
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    seen: list[str] = []
    try:
        try:
            receive(sock, "READY=1", time.monotonic() + 180, proc, seen)
            receive(sock, "WATCHDOG=1", time.monotonic() + 10, proc, seen)
            deadline = time.monotonic() + 10  # written just after READY=1
            while not port_file.is_file() and time.monotonic() < deadline:
                time.sleep(0.05)
            port = int(port_file.read_text().strip())
            for path in ("/healthz", "/metrics"):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                    assert response.status == 200, path
            proc.send_signal(signal.SIGTERM)
            receive(sock, "STOPPING=1", time.monotonic() + 30, proc, seen)
            assert proc.wait(timeout=30) == 0
        except BaseException:
            log.seek(0)
            print(log.read()[-5000:])  # shown by pytest with the failure
            raise
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        sock.close()
        notify_path.unlink(missing_ok=True)
        sockdir.rmdir()
