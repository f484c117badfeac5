"""A verifier daemon on this machine, as a child process (``specd demo`` and ``specd bench``).

It runs ``python -m specd.daemon`` on a free loopback port with a config written for it, waits until
``/healthz`` says ready (relaying the daemon's progress lines), and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from specd.shared.config import dump_toml, load_config, to_dict
from specd.shared.errors import SpecdError
from specd.shared.models import Progress


class VerifierFailed(SpecdError):
    """The local verifier did not start."""


class LocalVerifier:
    """``async with LocalVerifier(overrides=...) as v: v.url``.

    ``cpus`` pins the daemon to those cores (``os.sched_setaffinity``) and ``threads`` sets its torch
    threads, so an edge drafter on the same machine does not compete with it for cores.
    """

    def __init__(self, config_path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                 cpus: set[int] | None = None, threads: int | None = None, progress: Progress | None = None,
                 start_timeout_s: float = 600.0, api_key: str | None = None) -> None:
        self.config = load_config(config_path, overrides={"server": {"host": "127.0.0.1", "port": 0},
                                                          **(overrides or {})})
        self.cpus, self.threads = cpus, threads
        self.say = progress or (lambda _msg: None)
        self.start_timeout_s = start_timeout_s
        self.api_key = api_key
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None
        self._relay: asyncio.Task | None = None
        self.log_tail: list[str] = []

    @property
    def url(self) -> str:
        if self.port is None:
            raise VerifierFailed("the local verifier is not running")
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> LocalVerifier:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def command(self, config_file: Path, port_file: Path) -> list[str]:
        command = [sys.executable, "-m", "specd.daemon", "--config", str(config_file), "--port", "0",
                   "--port-file", str(port_file)]
        if self.threads:
            command += ["--threads", str(self.threads)]
        return command

    async def start(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="specd-verifier-")
        folder = Path(self._dir.name)
        config_file, port_file = folder / "config.toml", folder / "port"
        # Only what differs from the defaults, so the daemon still tells a default from a value set on purpose.
        config_file.write_text(dump_toml(to_dict(self.config, changed_only=True)), encoding="utf-8")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        if self.api_key:
            env[self.config.server.api_key_env or "SPECD_API_KEY"] = self.api_key
        cpus = self.cpus

        def pin() -> None:  # in the child, before exec
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.say("Starting the verifier daemon (loading the target model)…")
        self.proc = subprocess.Popen(self.command(config_file, port_file), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                     preexec_fn=pin if cpus and hasattr(os, "sched_setaffinity") else None)
        self._relay = asyncio.create_task(asyncio.to_thread(self._relay_stderr))
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                await asyncio.sleep(0.1)
                tail = "\n".join(self.log_tail[-8:])
                raise VerifierFailed(f"the verifier exited with code {self.proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                await self.stop()
                raise VerifierFailed(f"the verifier was not ready after {self.start_timeout_s:.0f} s")
            if self.port is None and port_file.is_file() and port_file.read_text().strip():
                self.port = int(port_file.read_text().strip())
            if self.port is not None and await asyncio.to_thread(self._ready):
                return
            await asyncio.sleep(0.2)

    def _relay_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            # A progress bar redrawn with carriage returns arrives as one line: keep its last state.
            line = raw.decode("utf-8", "replace").rstrip().rsplit("\r", 1)[-1]
            self.log_tail = [*self.log_tail[-49:], line]
            if self.port is None and line:
                self.say(f"verifier: {line}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http}/healthz", timeout=2) as response:
                return bool(json.loads(response.read()).get("ready", response.status == 200))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.http}/healthz", timeout=5) as response:
            return json.loads(response.read())

    async def stop(self, timeout_s: float = 20.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        if self._relay is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._relay, 5)
            self._relay = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        self.port = None
        return proc.returncode if proc is not None else None
