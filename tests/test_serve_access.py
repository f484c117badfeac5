"""Who may use the local API and what it does when things are missing: the bearer key (compared in
constant time), no listening beyond loopback without one, a verifier that is down (local answers or
503), configuration errors that name their key and file, and `specd serve` as a user starts it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import openai
import pytest

from specd.desktop import cli
from specd.desktop.serve import app as serve_app
from specd.desktop.serve.service import api_key
from specd.shared.config import load_config, load_config_with_origins
from specd.shared.errors import ConfigError
from tests.serve_support import raw_http, serve_config, serving
from tests.tiny_models import save_tiny_model

CHAT = {"messages": [{"role": "user", "content": "w5 w6"}], "temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("access")
    return save_tiny_model(root / "target", seed=1), save_tiny_model(root / "draft", seed=2)


async def test_a_key_is_required_when_set_and_compared_in_constant_time(models, monkeypatch):
    compared = []
    real = serve_app.hmac.compare_digest

    def recording(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(serve_app.hmac, "compare_digest", recording)
    monkeypatch.setenv("SPECD_TEST_LOCAL_KEY", "s3cret")
    async with serving(*models, api={"api_key_env": "SPECD_TEST_LOCAL_KEY"}) as (_verifier, api):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, got, payload = await raw_http(api.url, "POST", "/v1/chat/completions", CHAT, headers=headers)
            error = json.loads(payload)["error"]
            assert status == 401 and error["code"] == "invalid_api_key" and got["www-authenticate"] == "Bearer"
            assert "s3cret" not in error["message"]
        status, _h, payload = await raw_http(api.url, "GET", "/api/tags")
        assert status == 401 and "API key" in json.loads(payload)["error"]  # Ollama's shape under /api
        status, _h, _p = await raw_http(api.url, "GET", "/health")
        assert status == 200  # a liveness probe needs no key
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="nope", max_retries=0).models.list()
        good = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="s3cret")
        assert (await good.chat.completions.create(model="m", **CHAT)).choices[0].message.content
    assert (b"Bearer s3cret", b"Bearer s3cret") in compared and (b"Bearer wrong", b"Bearer s3cret") in compared


def test_listening_beyond_loopback_needs_a_key(models, monkeypatch, tmp_path):
    monkeypatch.delenv("SPECD_LOCAL_API_KEY", raising=False)
    path = tmp_path / "config.toml"
    path.write_text('[api]\nhost = "0.0.0.0"\n')
    cfg, origins = load_config_with_origins(path)
    with pytest.raises(ConfigError) as refused:
        api_key(cfg, origins)
    message = str(refused.value)
    assert f'[api] host = "0.0.0.0" (in {path})' in message and "SPECD_LOCAL_API_KEY" in message
    monkeypatch.setenv("SPECD_LOCAL_API_KEY", "k")
    assert api_key(cfg, origins) == "k"
    assert api_key(load_config(None, {"api": {"host": "::1", "api_key_env": ""}})) is None  # loopback: no key


def test_the_command_refuses_an_exposed_server_before_loading_anything(models, monkeypatch, capsys):
    monkeypatch.delenv("SPECD_LOCAL_API_KEY", raising=False)
    code = cli.main(["serve", "--model-path", str(models[1]), "--api-host", "192.0.2.1"])
    err = capsys.readouterr().err
    assert code == 1 and "--api-host 192.0.2.1 listens beyond this machine" in err and "Traceback" not in err


def test_config_errors_name_the_key_and_the_file(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text('[client]\nserver_url = "ws://"\n')
    code = cli.main(["chat", "--config", str(path), "--prompt", "hi"])
    assert code == 1 and f'[client] server_url = "ws://" (in {path}): no host' in capsys.readouterr().err
    path.write_text('[api]\nport = 70000\n')
    code = cli.main(["serve", "--config", str(path)])
    assert code == 1 and f"{path}: [api] port" in capsys.readouterr().err


async def test_a_verifier_that_is_down_gives_local_answers_or_a_503(models):
    async with serving(*models, verifier=False) as (_none, api):
        aio = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="unused")
        answer = await aio.chat.completions.create(model="m", **CHAT)
        extra = answer.model_extra["specd"]
        assert extra["mode"] == "local" and extra["local_tokens"] == answer.usage.completion_tokens > 0
    async with serving(*models, verifier=False, client={"on_disconnect": "stop"}) as (_none, api):
        status, _h, payload = await raw_http(api.url, "POST", "/v1/chat/completions", CHAT)
        error = json.loads(payload)["error"]
        assert status == 503 and error["code"] == "verifier_unavailable" and "127.0.0.1:9" in error["message"]
        status, _h, payload = await raw_http(api.url, "POST", "/api/chat", {**CHAT, "stream": True})
        assert status == 503 and "127.0.0.1:9" in json.loads(payload)["error"]


async def test_cors_is_off_unless_origins_are_configured(models):
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    async with serving(*models, verifier=False) as (_none, api):
        _s, headers, _p = await raw_http(api.url, "GET", "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in headers
    async with serving(*models, verifier=False, api={"cors_origins": ["http://localhost:3000"]}) as (_none, api):
        status, headers, _p = await raw_http(api.url, "OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:3000"


async def test_specd_serve_as_a_user_runs_it(models, tmp_path):
    """The command: the base URL on stdout, answers, and a clean stop on SIGINT."""
    from specd.daemon.server import Verifier

    async with Verifier(load_config(None, {"models": {"target": str(models[0])}, "server": {"port": 0}})) as verifier:
        config = tmp_path / "config.toml"
        cfg = serve_config(models[1], verifier.url)
        from specd.shared.config import dump_toml, to_dict

        config.write_text(dump_toml(to_dict(cfg)))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "specd.desktop.cli", "serve", "--config",
                                                    str(config), "--api-port", "0", "--device", "cpu",
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    env=env)
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode().strip()
            assert line.startswith("http://127.0.0.1:") and line.endswith("/v1"), line
            aio = openai.AsyncOpenAI(base_url=line, api_key="unused")
            answer = await aio.chat.completions.create(model="m", **CHAT)
            assert answer.choices[0].message.content and answer.model_extra["specd"]["mode"] == "speculative"
        finally:
            proc.send_signal(signal.SIGINT)
            _out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()


async def test_web_pages_cannot_use_the_api_behind_the_users_back(models):
    """A page on another site (a simple POST needs no preflight) or under a rebound name is refused; apps,
    which send no Origin, and pages served from this machine are answered."""
    async with serving(*models, verifier=False) as (_none, api):
        rebound = {"Host": "attacker.example:11435"}
        status, _h, payload = await raw_http(api.url, "GET", "/v1/models", headers=rebound)
        assert status == 403 and json.loads(payload)["error"]["code"] == "foreign_host"
        page = {"Origin": "https://attacker.example", "Content-Type": "text/plain"}
        status, _h, payload = await raw_http(api.url, "POST", "/v1/chat/completions", CHAT, headers=page)
        error = json.loads(payload)["error"]
        assert status == 403 and error["code"] == "foreign_origin" and "[api] cors_origins" in error["message"]
        status, _h, payload = await raw_http(api.url, "POST", "/api/chat", CHAT, headers=page)
        assert status == 403 and "cors_origins" in json.loads(payload)["error"]  # Ollama's shape
        for fine in ({}, {"Origin": "http://localhost:3000"}, {"Host": "localhost"}):
            status, _h, _p = await raw_http(api.url, "GET", "/v1/models", headers=fine)
            assert status == 200, fine
    async with serving(*models, verifier=False, api={"cors_origins": ["https://attacker.example"]}) as (_none, api):
        status, _h, _p = await raw_http(api.url, "GET", "/v1/models", headers={"Origin": "https://attacker.example"})
        assert status == 200  # listed by the user
