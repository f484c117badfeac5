"""Typed, frozen configuration loaded from ``config.toml`` with ``tomllib``.

Every key of the file is a field below; an unknown key, a wrong type or an impossible value fails at
start with a message naming the key and where its value came from (:mod:`specd.shared.config_origins`:
the flag, the file, a layer such as the app's Settings, or the default). Layers (the desktop's
settings) and then command-line flags override the file through :func:`load_config`'s ``layers`` and
``overrides``. Secrets never live in the file: only the names of the environment variable or file
that hold them.
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import msgspec

from specd.shared.config_origins import ConfigLayer, Origins, key_name
from specd.shared.errors import ConfigError

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0.0)]

CONFIG_ENV = "SPECD_CONFIG"
EDGE_DEVICES = ("auto", "npu", "gpu", "cpu")
DRAFT_BACKENDS = ("auto", "torch", "onnxruntime-genai", "openvino")


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8765
    api_key_env: str = "SPECD_API_KEY"
    api_key_file: str = ""
    keys_file: str = ""  # named client keys; "": keys.toml beside the config file in use
    tls_cert: str = ""
    tls_key: str = ""
    insecure_no_auth: bool = False
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    batching: bool = True


class ClientConfig(_Section):
    server_url: str = "ws://127.0.0.1:8765"
    api_key_env: str = "SPECD_API_KEY"
    api_key_file: str = ""
    tls_verify: bool = True
    ca_file: str = ""
    on_disconnect: Literal["local", "stop"] = "local"
    connect_timeout_s: Seconds = 10.0
    reconnect_max_s: Seconds = 30.0


class ModelsConfig(_Section):
    target: str = "smollm2-135m-instruct"
    draft: str = "smollm2-135m-instruct"
    draft_backend: Literal["auto", "torch", "onnxruntime-genai", "openvino"] = "auto"
    # "auto": built at each candidate precision, measured against the verifier, the fastest kept
    # (specd.desktop.precision.choice); an explicit precision is built as it is.
    draft_precision: Literal["auto", "int4", "int8", "fp16", "fp32"] = "auto"
    cache_dir: str = ""


class SamplingConfig(_Section):
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.7
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.95
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_new_tokens: Positive = 256
    seed: Annotated[int, msgspec.Meta(ge=-1)] = -1


class SpeculationConfig(_Section):
    gamma: Positive | Literal["auto"] = "auto"
    gamma_max: Annotated[int, msgspec.Meta(ge=1, le=64)] = 16
    proposal_top_k: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    pipeline: bool = True
    mode_switching: bool = True
    context_proposer: bool = True


class GpuConfig(_Section):
    enabled: bool = True
    device_id: Annotated[int, msgspec.Meta(ge=0)] = 0


class NpuConfig(_Section):
    enabled: bool = True
    model_path: str = ""


class DevicesConfig(_Section):
    edge_device: Literal["auto", "npu", "gpu", "cpu"] = "auto"
    gpu: GpuConfig = GpuConfig()
    npu: NpuConfig = NpuConfig()


class LimitsConfig(_Section):
    max_sessions: Positive = 16
    max_input_tokens: Positive = 4096
    max_total_tokens: Positive = 8192
    max_draft: Annotated[int, msgspec.Meta(ge=1, le=64)] = 16
    max_support: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1_048_576
    idle_timeout_s: Seconds = 300.0
    max_messages_per_second: Annotated[int, msgspec.Meta(ge=0)] = 200
    max_batch_tokens: Positive = 512
    kv_cache_gib: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    goodput_budget: bool = True


class ApiConfig(_Section):
    """``specd serve`` and the tray app's Local API: OpenAI- and Ollama-compatible HTTP on the laptop."""

    host: str = "127.0.0.1"
    port: Port = 11435
    api_key_env: str = "SPECD_LOCAL_API_KEY"  # empty, or the variable unset: no key (loopback only)
    max_concurrent: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call it; "*" only if listed here


class ChatConfig(_Section):
    # The system prompt a new conversation starts with (each conversation can change its own).
    system_prompt: str = ""


class Config(_Section):
    server: ServerConfig = ServerConfig()
    client: ClientConfig = ClientConfig()
    models: ModelsConfig = ModelsConfig()
    sampling: SamplingConfig = SamplingConfig()
    speculation: SpeculationConfig = SpeculationConfig()
    devices: DevicesConfig = DevicesConfig()
    limits: LimitsConfig = LimitsConfig()
    api: ApiConfig = ApiConfig()
    chat: ChatConfig = ChatConfig()


def _check(cfg: Config, origins: Origins) -> None:
    """Rules that span keys; each message names the keys involved and where each value came from."""
    spec, lim, srv = cfg.speculation, cfg.limits, cfg.server

    def said(dotted: str) -> str:
        return origins.describe(dotted, value_at(cfg, dotted))

    if isinstance(spec.gamma, int) and spec.gamma > spec.gamma_max:
        raise ConfigError(f"{said('speculation.gamma')} exceeds {said('speculation.gamma_max')}")
    if spec.gamma_max > lim.max_draft:
        raise ConfigError(f"{said('speculation.gamma_max')} exceeds {said('limits.max_draft')}")
    if spec.proposal_top_k > lim.max_support:
        raise ConfigError(f"{said('speculation.proposal_top_k')} exceeds {said('limits.max_support')}")
    # max_input_tokens >= max_total_tokens is not refused: the verifier caps the prompt limit below the
    # total with a warning naming both sources, as it does when the model's context caps the total.
    if bool(srv.tls_cert) != bool(srv.tls_key):
        given = "server.tls_cert" if srv.tls_cert else "server.tls_key"
        raise ConfigError(f"[server] tls_cert and tls_key must be given together; only {said(given)} is set")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", srv.device):
        raise ConfigError(f"{said('server.device')}: allowed auto, cpu, cuda or cuda:N")
    problem = url_problem(cfg.client.server_url)
    if problem:
        raise ConfigError(f"{said('client.server_url')}: {problem}")
    if not cfg.api.host.strip():
        raise ConfigError(f"{said('api.host')}: no host; use 127.0.0.1 (this machine only) or an address to listen on")


def url_problem(url: str) -> str:
    """Why ``url`` cannot reach a verifier (empty when it can): the scheme, the host, the port."""
    if not re.match(r"wss?://", url):
        return "must start with ws:// or wss://"
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError as exc:  # a port that is not a number or out of range
        return f"bad port ({exc})"
    if not parsed.hostname:
        return "no host"
    if port == 0:
        return "port 0 is not a port a verifier listens on"
    return ""


def value_at(cfg: Config, dotted: str) -> Any:
    """The value of ``limits.max_total_tokens`` (any dotted key) in ``cfg``."""
    node: Any = cfg
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def _describe(exc: msgspec.ValidationError, origins: Origins, raw: dict[str, Any]) -> str:
    """msgspec's message, prefixed by the flag, file or layer that set the bad value."""
    text = str(exc)
    path = ""
    match = re.search(r" - at `\$(.*)`$", text)
    if match:
        text = text[: match.start()]
        path = match.group(1)
    keys = [k for k in re.findall(r"\.(\w+)", path)]
    unknown = re.match(r"Object contains unknown field `(\w+)`", text)
    section = "[" + ".".join(keys) + "]" if keys else "top level"
    if unknown:
        allowed = _allowed_keys(keys)
        source = origins.where(".".join([*keys, unknown.group(1)]))
        return (f"{source}: unknown key {unknown.group(1)!r} in {section}; "
                f"allowed: {', '.join(allowed)}")
    if text.startswith("Invalid enum value") and keys:
        text = f"{text[len('Invalid enum value '):]} is not allowed; use {_allowed_values(keys)}"
    text = text.replace("Expected", "expected")
    dotted = ".".join(keys)
    origin = origins.of(dotted) if keys else None
    if origin is not None and origin.flag:
        return f"{origins.describe(dotted, _raw_value(raw, keys))}: {text}"
    where = key_name(dotted) if keys else ""
    return f"{origins.where(dotted)}: {where}: {text}".replace(": : ", ": ")


def _raw_value(raw: dict[str, Any], keys: list[str]) -> Any:
    node: Any = raw
    for key in keys:
        node = node[key]
    return node


def _allowed_values(keys: list[str]) -> str:
    """The literal choices (and other accepted types) of the field at ``keys``."""
    struct: Any = Config
    for key in keys[:-1]:
        struct = type(getattr(struct(), key))
    hint = typing.get_type_hints(struct, include_extras=True)[keys[-1]]
    choices: list[str] = []
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for arg in options:
        if typing.get_origin(arg) is Literal:
            choices += [repr(v).replace("'", '"') for v in typing.get_args(arg)]
        elif typing.get_origin(arg) is typing.Annotated:
            choices.append(f"an integer >= {typing.get_args(arg)[1].ge}")
    return " or ".join(choices)


def _allowed_keys(keys: list[str]) -> list[str]:
    struct: Any = Config
    for key in keys:
        struct = type(getattr(struct(), key))
    return list(struct.__struct_fields__)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def default_config_path() -> Path | None:
    """``$SPECD_CONFIG``, else ``./config.toml``, else the per-user and system files, else None."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    from specd.shared.paths import user_config_dir

    for candidate in (Path.cwd() / "config.toml", user_config_dir() / "config.toml",
                      Path("/etc/specd/config.toml")):
        if candidate.is_file():
            return candidate
    return None


LayerValues = dict[str, Any] | ConfigLayer


def load_config(path: str | Path | None = None, overrides: LayerValues | None = None,
                layers: list[LayerValues] | None = None) -> Config:
    """Load the file (or the built-in defaults), apply ``layers`` then ``overrides``, and validate.

    ``overrides`` is nested like the file, e.g. ``{"server": {"port": 9000}}``; values that are
    None are ignored so unset flags do not override the file. A :class:`ConfigLayer` (rather than a
    plain dict) also says where its values came from, so errors name the right flag or file.
    """
    return load_config_with_origins(path, overrides, layers)[0]


def load_config_with_origins(path: str | Path | None = None, overrides: LayerValues | None = None,
                             layers: list[LayerValues] | None = None) -> tuple[Config, Origins]:
    """:func:`load_config`, and where each value came from (for messages about values in use)."""
    origins = Origins()
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        origins.record(ConfigLayer(raw, str(path)))
    for layer in [*(layers or []), *([overrides] if overrides else [])]:
        labelled = layer if isinstance(layer, ConfigLayer) else ConfigLayer(layer, "overrides")
        values = _drop_none(dict(labelled.values))
        origins.record(ConfigLayer(values, labelled.where, labelled.flags))
        raw = _merge(raw, values)
    try:
        cfg = msgspec.convert(raw, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, origins, raw)) from None
    _check(cfg, origins)
    return cfg, origins


def _drop_none(tree: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            inner = _drop_none(value)
            if inner:
                out[key] = inner
        elif value is not None:
            out[key] = value
    return out


def read_secret(env_name: str, file_name: str) -> str | None:
    """A secret from the environment variable ``env_name`` or the first line of ``file_name``."""
    if env_name:
        value = os.environ.get(env_name, "").strip()
        if value:
            return value
    if file_name:
        try:
            value = Path(file_name).expanduser().read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the key file {file_name}: {exc.strerror}") from None
        return value[0].strip() if value and value[0].strip() else None
    return None


def to_dict(cfg: Config, *, changed_only: bool = False) -> dict[str, Any]:
    """The config as plain nested dicts (as it would be written to TOML); ``changed_only``: only the
    values that differ from the defaults."""
    tree = _lists(msgspec.to_builtins(cfg))  # TOML has arrays, not tuples: a tuple field reads back as a list
    return _changes(tree, _lists(msgspec.to_builtins(Config()))) if changed_only else tree


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    return value


def _changes(tree: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            inner = _changes(value, defaults.get(key, {}))
            if inner:
                out[key] = inner
        elif value != defaults.get(key):
            out[key] = value
    return out


def dump_toml(tree: dict[str, Any]) -> str:
    """Write nested dicts of strings, numbers, booleans and lists as TOML (what ``load_config`` reads)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return msgspec.json.encode(v).decode()  # a JSON string is a valid TOML basic string
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(item) for item in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def table(prefix: str, node: dict[str, Any]) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if prefix and (scalars or not node):
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for key, child in node.items():
            if isinstance(child, dict):
                table(f"{prefix}.{key}" if prefix else key, child)

    table("", tree)
    return "\n".join(lines) + "\n"
