"""`specd demo` — what `make demo` runs — end to end on the embedded pair, shortened to one prompt: it settles
the draft precision by itself and says why."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


def test_the_demo_streams_an_answer_and_measures_the_speedup(smollm2_folder):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "specd.desktop.cli", "demo", "--prompts", "1",
                           "--max-new-tokens", "24"], capture_output=True, text=True, timeout=600, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    out, err = done.stdout, done.stderr
    assert "[1] Explain in three sentences why the sky is blue." in out
    assert "Verifier ready at ws://127.0.0.1:" in err
    # draft_precision "auto" settles against the verifier and says why (measured now, or recorded before)
    assert re.search(r"Draft precision: int\d, measured fastest on .* against int\d", err), err[-3000:]
    assert re.search(r"speculative: 24 tokens .* speculative · acceptance \d+%", err)
    assert re.search(r"cloud-only: +24 tokens", err)
    assert re.search(r"speedup: +\d+\.\d\dx", out)
    assert "identical to cloud-only (greedy): 1 of 1 answers" in out
    assert "Traceback" not in err
