"""`specd serve`'s Ollama-compatible API (/api/chat, /api/generate, /api/tags, /api/show, /api/version)
read as Ollama's clients read it: NDJSON, one object per line, the last with ``done`` and the counts."""

from __future__ import annotations

import json

import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from tests.serve_support import raw_http, serving
from tests.test_chat_cli import greedy_ids
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ollama")
    return save_tiny_model(root / "target", seed=1), save_tiny_model(root / "draft", seed=2)


@pytest.fixture(scope="module")
def tokenizer(models):
    return AutoTokenizer.from_pretrained(str(models[0]))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(models):
    async with serving(*models) as (_verifier, api):
        yield api


def ndjson(payload: bytes) -> list[dict]:
    """Ollama's stream: every line one whole JSON object, newline-terminated."""
    assert payload.endswith(b"\n")
    return [json.loads(line) for line in payload[:-1].split(b"\n")]


def greedy_text(models, tokenizer, chat: list[dict], n: int) -> tuple[list[int], str]:
    prompt = list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))
    ids = greedy_ids(models[0], prompt, n)
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


async def test_chat_streams_ndjson_with_the_target_greedy(api, models, tokenizer):
    messages = [{"role": "system", "content": "w4"}, {"role": "user", "content": "w33 w34 w35"}]
    ids, text = greedy_text(models, tokenizer, messages, 10)
    status, headers, payload = await raw_http(api.url, "POST", "/api/chat", {
        "model": "anything", "messages": messages, "options": {"temperature": 0, "num_predict": 10}})
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    *parts, last = ndjson(payload)
    assert parts and all(p["done"] is False and p["message"]["role"] == "assistant" for p in parts)
    assert "".join(p["message"]["content"] for p in parts) == text
    assert last["done"] is True and last["done_reason"] == "length" and last["message"]["content"] == ""
    assert last["eval_count"] == len(ids) and last["prompt_eval_count"] > 0
    assert last["total_duration"] >= last["eval_duration"] > 0 and last["specd"]["mode"] == "speculative"
    assert last["model"] == "target" and last["created_at"].endswith("Z")

    status, _h, payload = await raw_http(api.url, "POST", "/api/chat", {
        "messages": messages, "stream": False, "options": {"temperature": 0, "num_predict": 10}})
    whole = json.loads(payload)
    assert status == 200 and whole["message"]["content"] == text and whole["done"] is True


async def test_generate_with_a_system_prompt_stop_and_raw(api, models, tokenizer):
    chat = [{"role": "system", "content": "w8"}, {"role": "user", "content": "w9"}]
    _ids, text = greedy_text(models, tokenizer, chat, 12)
    stop = text.split(" ")[3]
    status, _h, payload = await raw_http(api.url, "POST", "/api/generate", {
        "prompt": "w9", "system": "w8", "options": {"temperature": 0, "num_predict": 12, "stop": [stop]}})
    *parts, last = ndjson(payload)
    assert status == 200 and "".join(p["response"] for p in parts) == text[:text.index(stop)]
    assert last["done_reason"] == "stop"

    raw_ids = greedy_ids(models[0], tokenizer("w5 w6").input_ids, 6)
    status, _h, payload = await raw_http(api.url, "POST", "/api/generate", {
        "prompt": "w5 w6", "raw": True, "stream": False, "options": {"temperature": 0, "num_predict": 6}})
    assert json.loads(payload)["response"] == tokenizer.decode(raw_ids, skip_special_tokens=True)


async def test_an_empty_request_loads_the_model_as_ollama_does(api):
    status, _h, payload = await raw_http(api.url, "POST", "/api/generate", {"model": "target"})
    body = json.loads(payload)
    assert status == 200 and body["done"] is True and body["done_reason"] == "load"


async def test_tags_show_and_version(api):
    status, _h, payload = await raw_http(api.url, "GET", "/api/tags")
    (model,) = json.loads(payload)["models"]
    assert status == 200 and model["name"] == model["model"] == "target"
    assert model["specd"]["device"] == "cpu"
    status, _h, payload = await raw_http(api.url, "POST", "/api/show", {"model": "target"})
    assert status == 200 and json.loads(payload)["model_info"]["specd.context_length"] == 512
    status, _h, payload = await raw_http(api.url, "GET", "/api/version")
    assert status == 200 and json.loads(payload)["version"].count(".") == 2


@pytest.mark.parametrize(("body", "named"), [
    ({"messages": [{"role": "user", "content": "w5"}], "format": "json"}, "format"),
    ({"messages": [{"role": "user", "content": "w5"}], "options": {"repeat_penalty": 1.3}}, "options.repeat_penalty"),
    ({"messages": [{"role": "user", "content": "w5"}], "options": {"temperature": -1}}, "options.temperature"),
    ({"messages": "w5"}, "messages"),
])
async def test_errors_are_ollama_s_shape_and_name_the_field(api, body, named):
    status, _h, payload = await raw_http(api.url, "POST", "/api/chat", body)
    error = json.loads(payload)
    assert status == 400 and list(error) == ["error"] and named in error["error"]
    status, _h, payload = await raw_http(api.url, "POST", "/api/chat", b"[1, 2")
    assert status == 400 and "not valid JSON" in json.loads(payload)["error"]
