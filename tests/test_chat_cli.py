"""`specd chat` as a user runs it: a real process talking to a real verifier on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specd.daemon.server import Verifier
from specd.shared.config import dump_toml, load_config, to_dict
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "target", seed=1)


def verifier_config(target):
    """The tiny target on a free port (never the default 8765, which another verifier may hold)."""
    return load_config(None, overrides={"models": {"target": str(target)}, "server": {"port": 0}})


def client_config(tmp_path, target, **extra) -> str:
    cfg = load_config(None, overrides={"models": {"draft": str(target), "draft_backend": "torch"}, **extra})
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(to_dict(cfg)))
    return str(path)


async def specd(*args: str, stdin: str = "") -> tuple[int, str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "specd.desktop.cli", *args,
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout=180)
    return proc.returncode, out.decode(), err.decode()


@torch.no_grad()
def greedy_ids(folder, prompt_ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=2,
                         pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()


async def test_one_shot_json_equals_the_target_greedy(target, tmp_path):
    config = client_config(tmp_path, target)
    async with Verifier(verifier_config(target)) as verifier:
        code, out, err = await specd("chat", "--config", config, "--host", "127.0.0.1", "--port",
                                     str(verifier.port), "--prompt", "w5 w9 w11", "--temperature", "0",
                                     "--max-new-tokens", "24", "--json", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "w5 w9 w11"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    assert result["prompt_token_ids"] == list(prompt)
    assert result["token_ids"] == greedy_ids(target, list(prompt), 24)
    assert result["text"] == tokenizer.decode(result["token_ids"], skip_special_tokens=True)
    stats = result["stats"]
    for key in ("acceptance_rate", "rounds", "tokens_per_second", "gamma_mean", "device", "backend", "edge_ms",
                "network_ms", "verify_ms", "mode"):
        assert key in stats, key
    assert stats["mode"] == "speculative" and stats["backend"] == "torch" and stats["rounds"] > 0
    assert stats["acceptance_rate"] == 1.0  # the draft is the target itself


async def test_interactive_session_keeps_the_conversation_and_starts_over(target, tmp_path):
    config = client_config(tmp_path, target)
    async with Verifier(verifier_config(target)) as verifier:
        code, out, err = await specd("chat", "--config", config, "--port", str(verifier.port), "--host", "127.0.0.1",
                                     "--temperature", "0", "--max-new-tokens", "8", "--json",
                                     stdin="w5 w6\nw7\n/new\nw5 w6\n/quit\nnever sent\n")
    assert code == 0, err
    answers = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(answers) == 3
    first, second, fresh = answers
    assert len(second["prompt_token_ids"]) > len(first["prompt_token_ids"]) + len(first["token_ids"])
    assert fresh["prompt_token_ids"] == first["prompt_token_ids"]
    assert fresh["token_ids"] == first["token_ids"]


async def test_a_missing_verifier_gives_one_clear_line(target, tmp_path):
    config = client_config(tmp_path, target, client={"on_disconnect": "stop"})
    code, _out, err = await specd("chat", "--config", config, "--port", "9", "--host", "127.0.0.1", "--prompt", "hi")
    assert code == 1
    assert "cannot reach the verifier at 127.0.0.1:9" in err
    assert "Traceback" not in err


async def test_bad_flags_are_refused_with_the_reason(tmp_path):
    code, _out, err = await specd("chat", "--gamma", "lots", "--prompt", "hi")
    assert code == 1 and '--gamma must be "auto" or a whole number' in err
    code, _out, err = await specd("chat", "--temperature", "-1", "--prompt", "hi")
    assert code == 1 and "temperature" in err and "Traceback" not in err
