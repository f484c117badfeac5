"""`specd serve`'s OpenAI-compatible API, driven by the official `openai` package and by raw HTTP, in front
of a real verifier on 127.0.0.1 with tiny models: greedy answers equal the target's own, the stream's
framing is OpenAI's byte for byte, stop sequences, lengths, usage, errors, concurrency and a client that
leaves mid-stream."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
import pytest_asyncio
from transformers import AutoTokenizer

from specd.desktop.drafters.torch_drafter import TorchDrafter
from specd.shared.protocol.states import ServerState
from tests.daemon_support import eventually
from tests.serve_support import raw_http, serving, sse_events
from tests.test_chat_cli import greedy_ids
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.asyncio(loop_scope="module")
PROMPT = "w5 w9 w11"
LONG = "w33 w34 w35"  # greedy, the tiny target runs far without end-of-sequence from this one


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return save_tiny_model(root / "target", seed=1), save_tiny_model(root / "draft", seed=2)


@pytest.fixture(scope="module")
def tokenizer(models):
    return AutoTokenizer.from_pretrained(str(models[0]))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(models):
    async with serving(*models) as (verifier, api):
        yield verifier, api


def prompt_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def expected(models, tokenizer, text: str, n: int) -> tuple[list[int], str]:
    ids = greedy_ids(models[0], prompt_ids(tokenizer, text), n)
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def chat(text: str, **kwargs):
    return {"model": "specd", "messages": [{"role": "user", "content": text}], "temperature": 0, **kwargs}


async def test_the_openai_package_sync_and_async_streamed_or_not_gets_the_target_greedy(served, models, tokenizer):
    _verifier, api = served
    ids, text = expected(models, tokenizer, PROMPT, 24)
    sync = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused")
    aio = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="unused")
    request = chat(PROMPT, max_tokens=24)

    whole = await asyncio.to_thread(lambda: sync.chat.completions.create(**request))
    assert whole.choices[0].message.content == text
    assert tokenizer(text, add_special_tokens=False).input_ids == [i for i in ids if i != 2]  # token-identical
    assert whole.usage.prompt_tokens == len(prompt_ids(tokenizer, PROMPT))
    assert whole.usage.completion_tokens == len(ids)
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + len(ids)
    assert whole.choices[0].finish_reason == ("stop" if ids[-1] == 2 else "length")
    extra = whole.model_extra["specd"]
    assert extra["mode"] == "speculative" and extra["device"] == "cpu" and extra["backend"] == "torch"
    assert "acceptance_rate" in extra and "tokens_per_forward" in extra and extra["stats_line"]

    def stream_sync() -> str:
        return "".join(c.choices[0].delta.content or "" for c in sync.chat.completions.create(**request, stream=True))

    assert await asyncio.to_thread(stream_sync) == text
    assert (await aio.chat.completions.create(**request)).choices[0].message.content == text
    parts, usage = [], None
    streamed = await aio.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    async for chunk in streamed:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        else:
            usage = chunk.usage
    assert "".join(parts) == text
    assert usage is not None and usage.completion_tokens == len(ids)

    completion = await aio.completions.create(model="specd", prompt=" ".join(f"w{i}" for i in (5, 9)), temperature=0,
                                              max_tokens=8)
    raw_ids = greedy_ids(models[0], tokenizer("w5 w9").input_ids, 8)
    assert completion.choices[0].text == tokenizer.decode(raw_ids, skip_special_tokens=True)
    assert completion.usage.completion_tokens == len(raw_ids)


async def test_greedy_answers_equal_specd_chat(served, models, tmp_path, capsys):
    verifier, api = served
    from specd.desktop import cli
    from tests.test_chat_cli import client_config

    config = client_config(tmp_path, models[1])
    # The command itself (in a thread: it runs its own event loop), as `specd chat --temperature 0 --json`.
    code = await asyncio.to_thread(cli.main, ["chat", "--config", config, "--host", "127.0.0.1", "--port",
                                              str(verifier.port), "--prompt", PROMPT, "--temperature", "0",
                                              "--max-new-tokens", "24", "--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    cli_answer = json.loads(out.strip().splitlines()[-1])
    aio = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="unused")
    answer = await aio.chat.completions.create(**chat(PROMPT, max_tokens=24))
    assert answer.choices[0].message.content == cli_answer["text"]
    assert answer.usage.completion_tokens == len(cli_answer["token_ids"])


async def test_the_stream_is_framed_as_openai_sends_it(served, models, tokenizer):
    _verifier, api = served
    _ids, text = expected(models, tokenizer, LONG, 6)
    status, headers, payload = await raw_http(api.url, "POST", "/v1/chat/completions",
                                              chat(LONG, max_tokens=6, stream=True,
                                                   stream_options={"include_usage": True}))
    assert status == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    events = sse_events(payload)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for raw, chunk in zip(events, chunks, strict=False):  # compact JSON, UTF-8, as OpenAI writes it
        assert raw == json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()
    first, *middle, last, usage = chunks
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == api.state.model for c in chunks)
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}] and first["usage"] is None
    assert all(list(c["choices"][0]["delta"]) == ["content"] and c["choices"][0]["finish_reason"] is None
               for c in middle)
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == text
    assert last["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert last["specd"]["mode"] == "speculative"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6


async def test_stop_sequences_cut_across_tokens_and_are_never_sent(served, models, tokenizer):
    _verifier, api = served
    ids, text = expected(models, tokenizer, LONG, 12)
    words = text.split(" ")
    stop = words[3][-1:] + " " + words[4][:2]  # begins inside one token and ends inside the next
    cut = text[:text.index(stop)]
    aio = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="unused")
    whole = await aio.chat.completions.create(**chat(LONG, max_tokens=12, stop=["never there", stop]))
    assert whole.choices[0].message.content == cut
    assert whole.choices[0].finish_reason == "stop"
    through = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k], skip_special_tokens=True))
    assert whole.usage.completion_tokens == through  # the tokens through the one that completed the stop
    parts = [c.choices[0].delta.content or "" async for c in
             await aio.chat.completions.create(**chat(LONG, max_tokens=12, stop=stop, stream=True))]
    assert "".join(parts) == cut and stop not in "".join(parts)
    assert not any(stop[:2] in p and stop not in p for p in parts[-1:])  # the held-back start never leaks
    short = await aio.chat.completions.create(**chat(LONG, max_tokens=3))
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].message.content == tokenizer.decode(ids[:3], skip_special_tokens=True)


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"n": 2}, "n", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "unsupported_parameter"),
    ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"temperature": "hot"}, "temperature", "invalid_value"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "unsupported_parameter"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
])
async def test_bad_or_unhonourable_fields_are_400s_that_name_them(served, body, param, code):
    _verifier, api = served
    status, _headers, payload = await raw_http(api.url, "POST", "/v1/chat/completions", {**chat("w5"), **body})
    assert status == 400
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert param in error["message"]


async def test_errors_in_openai_s_shape_reach_the_openai_package(served):
    _verifier, api = served
    aio = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await aio.chat.completions.create(**chat("w5", n=3))
    assert caught.value.param == "n" and caught.value.code == "unsupported_parameter"
    status, _h, payload = await raw_http(api.url, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(payload)["error"]["code"] == "invalid_json"
    status, _h, payload = await raw_http(api.url, "GET", "/v1/nothing")
    assert status == 404 and json.loads(payload)["error"]["type"] == "not_found_error"
    status, _h, payload = await raw_http(api.url, "POST", "/v1/chat/completions",
                                         chat(" ".join(["w7"] * 600), max_tokens=4))
    assert status == 400 and json.loads(payload)["error"]["code"] == "context_length_exceeded"


async def test_models_and_health_name_the_target_draft_and_device(served):
    _verifier, api = served
    aio = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="unused")
    listed = await aio.models.list()
    (model,) = listed.data
    assert model.id == api.state.model == "target"  # the verifier's target, named in its handshake
    assert model.model_extra["specd"]["device"] == "cpu" and model.model_extra["specd"]["backend"] == "torch"
    status, _h, payload = await raw_http(api.url, "GET", "/health")
    assert status == 200 and json.loads(payload)["status"] == "ok"


async def test_four_streams_at_once_are_each_answered_whole(served, models, tokenizer):
    _verifier, api = served
    aio = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="unused")
    prompts = ["w5 w9 w11", "w33 w34 w35", "w7 w8", "w40 w41 w42 w43"]

    async def one(text: str) -> str:
        stream = await aio.chat.completions.create(**chat(text, max_tokens=16, stream=True))
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    answers = await asyncio.gather(*(one(p) for p in prompts))
    assert answers == [expected(models, tokenizer, p, 16)[1] for p in prompts]
    assert len(api.pool.clients) == 4 and api.pool.in_flight == 0


async def test_a_client_leaving_mid_stream_stops_its_answer_and_frees_the_verifier(models, tokenizer, slow_drafter):
    async with serving(*models, speculation={"mode_switching": False}) as (verifier, api):
        status, _h, payload = await raw_http(api.url, "POST", "/v1/chat/completions",
                                             chat(LONG, max_tokens=400, stream=True), read_events=2)
        assert status == 200 and len(sse_events(payload.rpartition(b"\n\n")[0] + b"\n\n")) >= 2
        await eventually(lambda: api.pool.in_flight == 0, "the answer stopped")
        assert api.pool.finished["cancelled"] == 1
        await eventually(lambda: all(d.session.state is ServerState.READY for d in verifier.drivers),
                         "the verifier's request ended")
        aio = openai.AsyncOpenAI(base_url=f"{api.url}/v1", api_key="unused")
        after = await aio.chat.completions.create(**chat(PROMPT, max_tokens=12))
        assert after.choices[0].message.content == expected(models, tokenizer, PROMPT, 12)[1]
        assert len(api.pool.clients) == 1  # the same client answered: it was back in the pool


async def test_text_parts_developer_role_and_max_completion_tokens(served, models, tokenizer):
    _verifier, api = served
    _ids, text = expected(models, tokenizer, PROMPT, 5)
    parts = [{"type": "text", "text": "w5 w9"}, {"type": "text", "text": " w11"}]
    status, _h, payload = await raw_http(api.url, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": parts}], "temperature": 0, "max_completion_tokens": 5,
        "user": "someone", "seed": 3, "top_k": 0, "presence_penalty": 0, "stream": False})
    answer = json.loads(payload)
    assert status == 200 and answer["choices"][0]["message"]["content"] == text
    assert answer["usage"]["completion_tokens"] == 5 and answer["object"] == "chat.completion"


@pytest.fixture
def slow_drafter(monkeypatch):
    """A laptop-slow draft model: tiny models answer before a second request could arrive or a client leave."""
    import time

    fast = TorchDrafter.next_logits

    def next_logits(self, ahead=()):
        time.sleep(0.01)
        return fast(self, ahead)

    monkeypatch.setattr(TorchDrafter, "next_logits", next_logits)


async def test_requests_beyond_max_concurrent_wait_in_order(models, tokenizer, slow_drafter):
    async with serving(*models, api={"max_concurrent": 1}, speculation={"mode_switching": False}) as (_v, api):
        finished: list[int] = []

        async def one(index: int, text: str) -> str:
            _status, _h, payload = await raw_http(api.url, "POST", "/v1/chat/completions", chat(text, max_tokens=12))
            finished.append(index)
            return json.loads(payload)["choices"][0]["message"]["content"]

        prompts = ["w5 w9 w11", "w33 w34 w35", "w7 w8"]
        tasks = []
        for index, text in enumerate(prompts):
            tasks.append(asyncio.ensure_future(one(index, text)))
            await eventually(lambda n=index: api.pool.in_flight + api.pool.waiting == n + 1, "the request arrived")
        answers = await asyncio.gather(*tasks)
        assert answers == [expected(models, tokenizer, p, 12)[1] for p in prompts]
        assert finished == [0, 1, 2] and len(api.pool.clients) == 1
