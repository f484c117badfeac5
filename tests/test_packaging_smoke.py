"""The verifier bundle works as systemd runs it: build it with PyInstaller (as `make package-daemon`
does), start it on a tiny model with a notify socket this test owns, and see READY=1, a watchdog ping,
/healthz 200, and a clean STOPPING=1 exit on SIGTERM. Then start it again inside the unit's sandbox, as
far as that is built without systemd as PID 1 (tests/systemd_unit.py), and serve a greedy session.

Building takes about 2–3 minutes on two cores, so this is marked ``slow``; skip it locally with
``pytest -m "not slow"``, or point ``SPECD_VERIFIER_BUNDLE`` at an existing dist/specd-verifier to test
that bundle without building.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from specd.shared import messages as m
from specd.shared.fingerprint import tokenizer_fingerprint
from tests import systemd_unit
from tests.daemon_support import Client, greedy_reference
from tests.debian_tools import debian_tool
from tests.tiny_models import save_tiny_model, tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "packaging/linux/specd-verifier.service"

#: Run inside the sandbox: what it may do, as JSON (an error as its errno name).
SANDBOX_PROBE = """
import ctypes, errno, json, os, socket, sys
def attempt(action):
    try:
        return action()
    except OSError as exc:
        return errno.errorcode[exc.errno]
def ptrace_traceme():
    libc = ctypes.CDLL(None, use_errno=True)
    return "ok" if libc.ptrace(0, 0, None, None) == 0 else errno.errorcode[ctypes.get_errno()]
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({
    "ids": [os.getuid(), os.getgid()],
    **{key: status[key].strip() for key in ("NoNewPrivs", "CapBnd", "Seccomp")},
    "netlink": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close() or "ok"),
    "ptrace": ptrace_traceme(),
    "write /etc": attempt(lambda: open("/etc/specd-probe", "w").close() or "ok"),
    "write state": attempt(lambda: open(sys.argv[2] + "/probe", "w").close() or "ok"),
    "pids": [name for name in os.listdir("/proc") if name.isdigit()],
    "read by group": attempt(lambda: open(sys.argv[1]).read()),
}))
"""

pytestmark = [
    pytest.mark.slow,
    # Above the build's own limit (1200 s), which then reports the build's output; a loaded machine needs it.
    pytest.mark.timeout(1500),
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


def daemon_environment(notify_path: Path, state: Path, cache: Path) -> dict[str, str]:
    """This environment less anything of a real service's, plus what systemd gives the unit."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("JOURNAL_STREAM", "SPECD_API_KEY", "SPECD_CONFIG", "LISTEN_FDS")}
    env.update(NOTIFY_SOCKET=str(notify_path), HF_HUB_OFFLINE="1", HOME=str(state), STATE_DIRECTORY=str(state),
               CACHE_DIRECTORY=str(cache), XDG_CACHE_HOME=str(cache), HF_HOME=str(cache / "huggingface"))
    return env


@contextlib.contextmanager
def notify_socket(folder: Path) -> Iterator[tuple[socket.socket, Path]]:
    """A notify socket that any user may send to, in ``folder`` (AF_UNIX paths are limited to 108 bytes)."""
    path = folder / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        path.chmod(0o666)
        sock.settimeout(0.5)
        yield sock, path
    finally:
        sock.close()
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def daemon(command: list[str], log_path: Path, **popen: Any) -> Iterator[subprocess.Popen]:
    """The daemon as a process, its log printed with any failure, killed if it is still running at the end."""
    with log_path.open("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **popen)
        try:
            yield proc
        except BaseException:
            log.seek(0)
            print(log.read()[-5000:])  # shown by pytest with the failure
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def ready_port(sock: socket.socket, proc: subprocess.Popen, port_file: Path, seen: list[str]) -> int:
    receive(sock, "READY=1", time.monotonic() + 180, proc, seen)
    deadline = time.monotonic() + 10  # written just after READY=1
    while not port_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(port_file.read_text().strip())


def test_the_bundle_starts_like_a_notify_service(bundle, tmp_path):
    program = bundle / "specd-verifier"
    assert program.is_file() and os.access(program, os.X_OK)
    model = save_tiny_model(tmp_path / "target", seed=1)
    port_file = tmp_path / "port"
    command = [str(program), "--model", str(model), "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(port_file), "--device", "cpu", "--log-level", "info"]
    sockdir = Path(tempfile.mkdtemp(prefix="specd-notify-"))
    with notify_socket(sockdir) as (sock, notify_path):
        env = {**daemon_environment(notify_path, tmp_path / "state", tmp_path / "cache"), "WATCHDOG_USEC": "1000000"}
        with daemon(command, tmp_path / "daemon.log", cwd=tmp_path, env=env) as proc:
            seen: list[str] = []
            port = ready_port(sock, proc, port_file, seen)
            receive(sock, "WATCHDOG=1", time.monotonic() + 10, proc, seen)
            for path in ("/healthz", "/metrics"):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                    assert response.status == 200, path
            proc.send_signal(signal.SIGTERM)
            receive(sock, "STOPPING=1", time.monotonic() + 30, proc, seen)
            assert proc.wait(timeout=30) == 0
    sockdir.rmdir()


async def greedy_session(port: int, prompt: list[int], reference: list[int]) -> list[int]:
    """A session whose rounds draft the reference's next tokens and one wrong token, so each is corrected."""
    client = await Client.open(f"ws://127.0.0.1:{port}", tokenizer_fingerprint(tiny_tokenizer()))
    await client.start(prompt, len(reference), sampling=m.Sampling(temperature=0.0))
    while not client.session.finished:
        done = len(client.session.generated)
        await client.round([*reference[done:done + 2], 5])
    await client.close()
    return client.session.generated


def link_tree(source: Path, target: Path) -> None:
    """A copy of ``source`` made of hard links where the file system allows them."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copytree(source, target, copy_function=link, symlinks=True)


@pytest.fixture
def sandbox_tools() -> tuple[ctypes.CDLL, str, str]:
    if os.geteuid() != 0:
        pytest.skip("taking the dynamic user's ids and groups needs root, as systemd has")
    lib = systemd_unit.libseccomp()
    systemd_analyze, bwrap = debian_tool("systemd-analyze", "systemd"), debian_tool("bwrap", "bubblewrap")
    if lib is None or systemd_analyze is None or bwrap is None or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs libseccomp, systemd-analyze (Debian's systemd), bwrap (Debian's bubblewrap) and "
                    "/usr/bin/python3")
    return lib, systemd_analyze, bwrap


def assert_the_sandbox_holds(sandboxed: Callable[[list[str]], tuple[list[str], int]], work: Path, state: Path,
                             gids: list[int]) -> None:
    """Checked from inside with the system's Python (the bundle has no shell): the ids, no privileges, the
    filter, the mounts, the process namespace, and a file readable through one of the unit's groups only
    (as /dev/dri/renderD* and /dev/kfd are through render), although the user namespace shows it as nogroup."""
    node = work / "render-node"
    node.write_text("by group\n")
    if gids:
        os.chown(node, 0, gids[0])
    node.chmod(0o660)
    command, fd = sandboxed(["/usr/bin/python3", "-c", SANDBOX_PROBE, str(node), str(state)])
    probe = subprocess.run(command, pass_fds=[fd], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    facts = json.loads(probe.stdout)
    assert facts["ids"] == [systemd_unit.DYNAMIC_ID, systemd_unit.DYNAMIC_ID], facts
    assert facts["NoNewPrivs"] == "1" and int(facts["CapBnd"], 16) == 0 and facts["Seccomp"] == "2", facts
    assert facts["netlink"] == facts["ptrace"] == "EPERM", facts  # address families; @debug filtered out
    assert facts["write /etc"] == "EROFS" and facts["write state"] == "ok", facts
    assert len(facts["pids"]) <= 3, facts  # its own processes only
    assert facts["read by group"] == ("by group\n" if gids else "EACCES"), facts


def test_the_bundle_serves_inside_the_units_sandbox(bundle, sandbox_tools):
    lib, systemd_analyze, bwrap = sandbox_tools
    service = systemd_unit.unit_entries(UNIT.read_text())["Service"]
    one = dict(service)
    gids = systemd_unit.existing_gids(one["SupplementaryGroups"].split())
    # The dynamic user cannot enter pytest's folders (root's, mode 0700): everything it reads lives here.
    work = Path(tempfile.mkdtemp(prefix="specd-sandbox-"))
    try:
        work.chmod(0o755)
        link_tree(bundle, work / "specd-verifier")
        model = save_tiny_model(work / "target", seed=1)
        for file in model.iterdir():  # the weights are written 0600; the dynamic user must read them
            file.chmod(0o644)
        state, cache = work / "state", work / "cache"
        for folder in (state, cache):
            folder.mkdir()
            os.chown(folder, systemd_unit.DYNAMIC_ID, systemd_unit.DYNAMIC_ID)
        allowed = systemd_unit.allowed_syscalls(systemd_analyze, systemd_unit.values(service, "SystemCallFilter"))
        program = work / "filter.bpf"
        systemd_unit.write_seccomp_program(lib, program, allowed, one.get("SystemCallErrorNumber"),
                                           one["RestrictAddressFamilies"].split())
        with contextlib.ExitStack() as opened:
            def sandboxed(command: list[str]) -> tuple[list[str], int]:
                """The sandbox's command line, and the descriptor of its seccomp program (bwrap reads it whole)."""
                fd = os.open(program, os.O_RDONLY)
                opened.callback(os.close, fd)
                return systemd_unit.sandboxed(command, bwrap=bwrap, seccomp_fd=fd, gids=gids,
                                              writable=[state, cache], readable=[work]), fd

            assert_the_sandbox_holds(sandboxed, work, state, gids)
            port_file = state / "port"
            command, fd = sandboxed([str(work / "specd-verifier/specd-verifier"), "--model", str(model),
                                     "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
                                     "--device", "cpu", "--log-level", "info"])
            with notify_socket(work) as (sock, notify_path), \
                    daemon(command, work / "daemon.log", cwd="/", pass_fds=[fd],
                           env=daemon_environment(notify_path, state, cache)) as proc:
                port = ready_port(sock, proc, port_file, [])
                prompt = [1, 7, 8, 9, 10, 11]
                reference = greedy_reference(tiny_llama(1), prompt, 12, [2])
                assert asyncio.run(greedy_session(port, prompt, reference)) == reference
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
                    assert response.status == 200
    finally:
        shutil.rmtree(work)
