"""Reading the two APIs' requests into :class:`~specd.desktop.serve.answering.AnswerRequest`.

Each bad or unsupported field is a 400 that names it (``messages[2].content[0].type``): an app that
asks for tools, a JSON schema, log-probabilities or penalties gets told, never an answer that silently
ignored what it asked. Fields that change nothing about the answer (``user``, ``store``, Ollama's
``keep_alive`` and ``num_ctx``) are accepted and ignored, as apps send them by default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from specd.desktop.client.answer import Settings
from specd.desktop.serve.answering import AnswerRequest
from specd.desktop.serve.errors import ApiError, bad_value, unsupported
from specd.shared.sampling import SamplingParams

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 16
SEED_BOUND = 2**63


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return value


@dataclass(frozen=True, slots=True)
class Sampled:
    """The sampling fields a request set (None: the config's value)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None

    def settings(self, defaults: Settings) -> Settings:
        base = defaults.sampling
        sampling = SamplingParams(temperature=base.temperature if self.temperature is None else self.temperature,
                                  top_k=base.top_k if self.top_k is None else self.top_k,
                                  top_p=base.top_p if self.top_p is None else self.top_p)
        seed = defaults.seed if self.seed is None else (self.seed if self.seed >= 0 else None)
        return replace(defaults, sampling=sampling, seed=seed,
                       max_new_tokens=defaults.max_new_tokens if self.max_tokens is None else self.max_tokens)


def number(body: dict[str, Any], key: str, low: float, high: float, param: str | None = None) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_value(param or key, f"must be a number from {low:g} to {high:g}, not {json.dumps(value)}")
    return float(value)


def integer(body: dict[str, Any], key: str, low: int, high: int, param: str | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_value(param or key, f"must be a whole number from {low} to {high}, not {json.dumps(value)}")
    return value


def stops(value: Any, param: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) > MAX_STOPS:
        raise bad_value(param, f"must be a string or a list of at most {MAX_STOPS} strings")
    return tuple(s for s in items if s)


def flag(body: dict[str, Any], key: str, default: bool, param: str | None = None) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_value(param or key, f"must be true or false, not {json.dumps(value)}")
    return value


def refuse_unhonourable(body: dict[str, Any]) -> None:
    """OpenAI fields specd cannot honour, when set to anything but their no-op value."""
    if body.get("tools") or body.get("functions"):
        raise unsupported("tools" if body.get("tools") else "functions", "the model here does not call tools")
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none", "auto"):
            raise unsupported(key, "the model here does not call tools")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise unsupported("response_format", "constrained output (JSON, a schema) is not available; "
                                             'leave it out or use {"type": "text"}')
    if body.get("logprobs") or body.get("top_logprobs"):
        raise unsupported("logprobs" if body.get("logprobs") else "top_logprobs",
                          "the verifier does not return log-probabilities")
    if body.get("logit_bias"):
        raise unsupported("logit_bias", "it would change the target's distribution")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise unsupported(key, "penalties would change the target's distribution; leave it at 0")
    n = body.get("n")
    if n not in (None, 1):
        raise unsupported("n", f"one choice per request only, not {json.dumps(n)}")
    if body.get("best_of") not in (None, 1):
        raise unsupported("best_of", "one choice per request only")
    if body.get("echo"):
        raise unsupported("echo", "the prompt is not repeated in the answer")
    if body.get("suffix"):
        raise unsupported("suffix", "the model here does not fill in the middle")
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise unsupported("modalities", 'text only: ["text"]')


def openai_sampled(body: dict[str, Any]) -> Sampled:
    max_tokens = integer(body, "max_completion_tokens", 1, 1 << 20)
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", 1, 1 << 20)
    return Sampled(temperature=number(body, "temperature", 0.0, 100.0), top_p=_top_p(body, "top_p"),
                   top_k=integer(body, "top_k", 0, 1 << 20), max_tokens=max_tokens,
                   seed=integer(body, "seed", -SEED_BOUND, SEED_BOUND - 1))


def _top_p(body: dict[str, Any], key: str, param: str | None = None) -> float | None:
    value = number(body, key, 0.0, 1.0, param)
    if value == 0.0:
        raise bad_value(param or key, "must be above 0 (1 disables it)")
    return value


def conversation(messages: Any, param: str = "messages") -> list[dict[str, str]]:
    """Chat messages as the chat template takes them; content as a string or a list of text parts."""
    if not isinstance(messages, list) or not messages:
        raise bad_value(param, "must be a non-empty list of messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(message, dict):
            raise bad_value(where, "must be an object with role and content")
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls"):
            raise unsupported(f"{where}.role" if role in ("tool", "function") else f"{where}.tool_calls",
                              "the model here does not call tools")
        if role not in ROLES:
            raise bad_value(f"{where}.role",
                            f"must be one of system, developer, user, assistant, not {json.dumps(role)}")
        if message.get("images"):
            raise unsupported(f"{where}.images", "the model here reads text only")
        out.append({"role": ROLES[role], "content": _content(message.get("content"), f"{where}.content")})
    return out


def _content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise bad_value(param, "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "input_audio", "file", "image"):
                raise unsupported(f"{param}[{j}].type", f"the model here reads text only, not {kind}")
            raise bad_value(f"{param}[{j}]", 'must be {"type": "text", "text": "..."}')
        texts.append(part["text"])
    return "".join(texts)


def openai_chat(body: dict[str, Any], defaults: Settings, tokenizer: Any) -> AnswerRequest:
    refuse_unhonourable(body)
    chat = conversation(body.get("messages"))
    sampled = openai_sampled(body)
    return AnswerRequest(prompt_ids=_template(tokenizer, chat), settings=sampled.settings(defaults),
                         stops=stops(body.get("stop"), "stop"), max_tokens_given=sampled.max_tokens is not None)


def openai_completion(body: dict[str, Any], defaults: Settings, tokenizer: Any) -> AnswerRequest:
    refuse_unhonourable(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad_value("prompt", "must be a non-empty string (one prompt per request)")
    sampled = openai_sampled(body)
    return AnswerRequest(prompt_ids=list(tokenizer.encode(prompt)), settings=sampled.settings(defaults),
                         stops=stops(body.get("stop"), "stop"), max_tokens_given=sampled.max_tokens is not None,
                         prompt_param="prompt")


def stream_options(body: dict[str, Any]) -> bool:
    """Whether a streamed answer ends with a usage chunk (``stream_options.include_usage``)."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_value("stream_options", 'must be an object such as {"include_usage": true}')
    return flag(options, "include_usage", False, "stream_options.include_usage")


# -- Ollama -------------------------------------------------------------------------------------
OLLAMA_IGNORED = {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa",
                  "num_keep", "low_vram", "vocab_only"}
OLLAMA_NO_OP = {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "mirostat": 0,
                "min_p": 0.0, "typical_p": 1.0, "tfs_z": 1.0, "repeat_last_n": None, "penalize_newline": None}


def ollama_sampled(body: dict[str, Any]) -> tuple[Sampled, tuple[str, ...]]:
    """Ollama's ``options``: the sampling ones are honoured, the ones that would change the target's
    distribution are refused unless left at their no-op value."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad_value("options", "must be an object")
    for key, value in options.items():
        if key in OLLAMA_NO_OP and OLLAMA_NO_OP[key] is not None and value not in (None, OLLAMA_NO_OP[key]):
            raise unsupported(f"options.{key}", "it would change the target's distribution")
    if body.get("format"):
        raise unsupported("format", "constrained output (JSON, a schema) is not available")
    if body.get("tools"):
        raise unsupported("tools", "the model here does not call tools")
    if body.get("images"):
        raise unsupported("images", "the model here reads text only")
    predict = integer(options, "num_predict", -2, 1 << 20, "options.num_predict")
    sampled = Sampled(temperature=number(options, "temperature", 0.0, 100.0, "options.temperature"),
                      top_p=_top_p(options, "top_p", "options.top_p"),
                      top_k=integer(options, "top_k", 0, 1 << 20, "options.top_k"),
                      max_tokens=predict if predict is not None and predict > 0 else None,
                      seed=integer(options, "seed", -SEED_BOUND, SEED_BOUND - 1, "options.seed"))
    return sampled, stops(options.get("stop"), "options.stop")


def ollama_chat(body: dict[str, Any], defaults: Settings, tokenizer: Any) -> AnswerRequest:
    sampled, stop = ollama_sampled(body)
    chat = conversation(body.get("messages"))
    return AnswerRequest(prompt_ids=_template(tokenizer, chat), settings=sampled.settings(defaults), stops=stop,
                         max_tokens_given=sampled.max_tokens is not None)


def ollama_generate(body: dict[str, Any], defaults: Settings, tokenizer: Any) -> AnswerRequest:
    sampled, stop = ollama_sampled(body)
    prompt, system = body.get("prompt"), body.get("system")
    if not isinstance(prompt, str):
        raise bad_value("prompt", "must be a string")
    if system is not None and not isinstance(system, str):
        raise bad_value("system", "must be a string")
    if body.get("template"):
        raise unsupported("template", "the model's own chat template is used")
    if flag(body, "raw", False):
        ids = list(tokenizer.encode(prompt))
    else:
        chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = _template(tokenizer, chat)
    return AnswerRequest(prompt_ids=ids, settings=sampled.settings(defaults), stops=stop,
                         max_tokens_given=sampled.max_tokens is not None, prompt_param="prompt")


def _template(tokenizer: Any, chat: list[dict[str, str]]) -> list[int]:
    """The chat template, as ``EdgeClient.chat`` applies it (so answers equal ``specd chat``'s)."""
    try:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:  # a template that rejects the roles (e.g. no system role): say which
        raise bad_value("messages", f"the model's chat template refused these messages: {exc}") from None
    return list(ids)
