"""What a first-time user's mistakes print, from real `specd-verifier` and `specd chat` processes.

Each message names the real source of a value (the flag, the file, Settings or the default); a model
folder without a tokenizer says so and lists the files expected; a draft model that is not there is
refused in one line before anything starts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specd.daemon.limits import effective_limits
from specd.desktop.commands.launch import load_tokenizer
from specd.desktop.ui.user_settings import UserSettings, effective_config
from specd.shared.config import load_config, load_config_with_origins
from specd.shared.config_origins import ConfigLayer
from specd.shared.errors import ConfigError, ModelError
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.models import ensure_hf_folder, load_tokenizer_from
from tests.daemon_support import Client
from tests.tiny_models import save_tiny_model, tiny_tokenizer

pytestmark = pytest.mark.timeout(240)
torch.set_num_threads(1)
NO_TOKENIZER = "has no tokenizer: expected tokenizer.json, or tokenizer.model, or vocab.json with merges.txt"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)  # a 512-position context


@pytest.fixture(scope="module")
def untokenized_folder(tiny_folder, tmp_path_factory):
    """The tiny model with its weights and config but none of its tokenizer files."""
    folder = tmp_path_factory.mktemp("weights-only") / "model"
    shutil.copytree(tiny_folder, folder, ignore=shutil.ignore_patterns("tokenizer*", "*.jinja"))
    return folder


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "SPECD_CONFIG": os.devnull, "NOTIFY_SOCKET": "", "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **extra}


def serve_until_ready(args: list[str], port_file: Path, env: dict[str, str]) -> tuple[object, str]:
    """Start the verifier, read the limits its Welcome announces, stop it; returns (limits, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "specd.daemon", "--port", "0", "--port-file", str(port_file),
                             "--device", "cpu", "--threads", "1", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        while not port_file.exists():
            if proc.poll() is not None:
                pytest.fail(proc.communicate()[1])
            time.sleep(0.05)

        async def welcome_limits() -> object:
            client = await Client.open(f"ws://127.0.0.1:{int(port_file.read_text())}",
                                       tokenizer_fingerprint(tiny_tokenizer()))
            await client.close()
            return client.session.welcome.limits

        limits = asyncio.run(welcome_limits())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        return limits, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- item: limits given as flags are blamed on what really set them, and both caps read alike --------
@pytest.mark.parametrize(("file_text", "flags", "max_input", "warning"), [
    ("", ["--max-total-tokens", "256"], 255,
     "[limits] max_input_tokens = 4096 (the default) is not below --max-total-tokens 256; using 255"),
    ("[limits]\nmax_input_tokens = 4096\n", ["--max-total-tokens", "256"], 255,  # as the shipped config.toml
     "[limits] max_input_tokens = 4096 (in {file}) is not below --max-total-tokens 256; using 255"),
    ("[limits]\nmax_total_tokens = 256\n", [], 255,
     "[limits] max_input_tokens = 4096 (the default) is not below [limits] max_total_tokens = 256 (in {file}); "
     "using 255"),
    ("[limits]\nmax_input_tokens = 4096\n", [], 511,  # the tiny model's context caps the total instead
     "[limits] max_input_tokens = 4096 (in {file}) is not below the model's context of 512 positions; using 511"),
])
def test_a_small_total_caps_the_prompt_limit_with_one_warning_naming_its_sources(tiny_folder, tmp_path, file_text,
                                                                                 flags, max_input, warning):
    config_file = tmp_path / "config.toml"
    config_file.write_text(file_text)
    limits, stderr = serve_until_ready(["--model", str(tiny_folder), *flags], tmp_path / "port",
                                       environment(SPECD_CONFIG=str(config_file)))
    assert (limits.max_input_tokens, limits.max_total_tokens) == (max_input, max_input + 1)
    assert warning.format(file=config_file) in stderr, stderr
    assert "error" not in stderr
    if max_input == 511:
        assert ("[limits] max_total_tokens = 8192 (the default) exceeds the model's context of 512 positions; "
                "using 512") in stderr
    if "max_total_tokens = 256" not in file_text:  # the file did not set the total: no line blames it for it
        assert not [line for line in stderr.splitlines() if "max_total_tokens" in line and str(config_file) in line]


def test_the_cap_is_worded_the_same_whichever_value_is_smaller():
    said: list[str] = []
    flag = ConfigLayer({"limits": {"max_total_tokens": 300}}, "the command line",
                       {"limits.max_total_tokens": "--max-total-tokens"})
    cfg, origins = load_config_with_origins(None, flag)
    limits = effective_limits(cfg.limits, origins, max_positions=200, vocab_size=64, warn=said.append)
    assert (limits.max_total_tokens, limits.max_input_tokens, limits.max_support) == (200, 199, 64)
    assert said == ["--max-total-tokens 300 exceeds the model's context of 200 positions; using 200",
                    "[limits] max_input_tokens = 4096 (the default) is not below the model's context of 200 "
                    "positions; using 199"]
    said.clear()
    names = {"limits.max_input_tokens": "--max-input-tokens", "limits.max_total_tokens": "--max-total-tokens"}
    flags = ConfigLayer({"limits": {"max_input_tokens": 9000, "max_total_tokens": 100}}, "the command line", names)
    cfg, origins = load_config_with_origins(None, flags)
    limits = effective_limits(cfg.limits, origins, max_positions=0, vocab_size=64, warn=said.append)
    assert (limits.max_total_tokens, limits.max_input_tokens) == (100, 99)
    assert said == ["--max-input-tokens 9000 is not below --max-total-tokens 100; using 99"]
    said.clear()
    effective_limits(load_config(None).limits, origins, max_positions=0, vocab_size=64, warn=said.append)
    assert said == []  # the defaults fit a model of unknown context


# -- item: the desktop's Settings layer is named as the source of what the user set there ------------
def test_a_bad_value_from_settings_names_settings_not_the_config_file(tmp_path):
    config_file = tmp_path / "config.toml"
    config_file.write_text("[sampling]\ntemperature = 0.3\n")
    with pytest.raises(ConfigError) as err:
        effective_config(config_file, UserSettings(layer={"speculation": {"gamma": 20}}))
    assert str(err.value) == "[speculation] gamma = 20 (in Settings) exceeds [speculation] gamma_max = 16 (the default)"


# -- item: a model folder without a tokenizer ----------------------------------------------------------
def test_the_verifier_says_a_folder_has_no_tokenizer_and_which_files_it_expected(untokenized_folder):
    done = subprocess.run([sys.executable, "-m", "specd.daemon", "--model", str(untokenized_folder), "--port", "0",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120, env=environment())
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [f"specd-verifier: error: the model folder {untokenized_folder} {NO_TOKENIZER}, or vocab.txt; "
                      "copy the tokenizer files from where the model came from (they are saved with "
                      "tokenizer.save_pretrained)"]
    assert "sentencepiece" not in done.stderr and "Traceback" not in done.stderr


def test_the_draft_side_says_the_same_wherever_it_opens_a_folder(untokenized_folder, tmp_path):
    with pytest.raises(ModelError, match=NO_TOKENIZER):
        ensure_hf_folder(str(untokenized_folder))  # what the torch drafter and the converters load
    with pytest.raises(ModelError, match=NO_TOKENIZER):
        load_tokenizer_from(untokenized_folder)  # what every drafter's load_tokenizer reads
    # A folder with a tokenizer_config.json but nothing it configures (as a half-copied edge model).
    half = tmp_path / "half"
    half.mkdir()
    (half / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelError, match=f"the model folder {half} {NO_TOKENIZER}"):
        load_tokenizer(load_config(None, {"models": {"draft": str(half)}}))


# -- item: `specd chat --model-path` with a model that is not there ------------------------------------
async def specd_chat(*args: str, config: Path | None = None, cache: Path | None = None) -> tuple[int, str, str]:
    env = environment(**({"SPECD_CONFIG": str(config)} if config else {}),
                      **({"SPECD_CACHE_DIR": str(cache)} if cache else {}))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "specd.desktop.cli", "chat", *args,
                                                "--prompt", "hi", "--port", "9", stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode, out.decode(), err.decode()


async def test_a_missing_model_path_is_refused_in_one_line_before_anything_starts(tmp_path, untokenized_folder):
    missing = tmp_path / "nowhere" / "draft.gguf"
    code, out, err = await specd_chat("--model-path", str(missing))
    assert (code, out) == (1, "")
    assert err.splitlines() == [f"specd: --model-path: GGUF file {missing} does not exist"]
    code, _out, err = await specd_chat("--model-path", str(untokenized_folder), "--cloud-only")
    assert code == 1 and err.splitlines() == [f"specd: --model-path: the model folder {untokenized_folder} "
                                              f"{NO_TOKENIZER}, or vocab.txt; copy the tokenizer files from where "
                                              "the model came from (they are saved with tokenizer.save_pretrained)"]


async def test_a_draft_that_fails_with_its_tokenizer_is_an_error_not_cloud_only(tmp_path):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"not a model")
    code, _out, err = await specd_chat("--model-path", str(not_gguf))
    assert code == 1 and err.splitlines() == [f"specd: --model-path: {not_gguf} is not a GGUF file (it does not "
                                              "start with the bytes GGUF)"]
    # Past that check, no device can run it, and without its tokenizer there is no cloud-only answer either.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    code, _out, err = await specd_chat("--model-path", str(broken), config=None, cache=tmp_path / "cache")
    assert code == 1 and "cloud-only" not in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"specd: cannot load {broken}: ")


async def test_a_missing_draft_in_the_config_file_names_the_file(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[models]\ndraft = "{tmp_path / "gone"}"\n')
    code, _out, err = await specd_chat(config=config)
    assert code == 1
    assert err.splitlines() == [f"specd: [models] draft (in {config}): model folder {tmp_path / 'gone'} "
                                "does not exist"]


async def test_chat_flags_are_named_in_errors_not_the_config_file(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[sampling]\ntemperature = 0.3\n")
    code, _out, err = await specd_chat("--gamma", "20", config=config)
    assert code == 1 and err.splitlines() == ["specd: --gamma 20 exceeds [speculation] gamma_max = 16 (the default)"]
