"""The verifier as a real process (``python -m specd.daemon``) on a model folder: start on a free port,
signal it (SIGKILL, SIGTERM), restart it on the same port, read its memory use. For fault and load tests.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path


class DaemonProcess:
    """``python -m specd.daemon`` on a tiny model; start on a free port, restart on the same one."""

    def __init__(self, folder: Path, workdir: Path, *, args: tuple[str, ...] = (), config: str = "") -> None:
        self.folder, self.workdir, self.args = folder, workdir, args  # extra flags, e.g. ("--max-sessions", "64")
        self.port = 0
        self.proc: subprocess.Popen | None = None
        (workdir / "config.toml").write_text(config)  # TOML for what no flag sets (empty: the defaults)

    def start(self, timeout: float = 90.0) -> int:
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "SPECD_API_KEY"}
        env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "specd.daemon", "--config", str(self.workdir / "config.toml"),
             "--model", str(self.folder), "--port", str(self.port), "--port-file", str(port_file),
             "--device", "cpu", "--threads", "1", "--log-level", "warning", *self.args],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.workdir / "daemon.log", "ab"))  # noqa: SIM115
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited: {(self.workdir / 'daemon.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("the daemon did not start in time")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self.port

    async def astart(self) -> int:
        return await asyncio.to_thread(self.start)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def rss_kib(self) -> int | None:
        """The process's resident memory (Linux ``/proc``), or None where unavailable."""
        if self.proc is None:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None
