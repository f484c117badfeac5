"""``specd chat``: talk to the target model through the verifier, with the draft model on this machine.

Interactive by default (line editing and history; ``/new`` starts over, ``/quit`` leaves), or one answer
with ``--prompt``. ``--json`` prints the answer with its stats as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlparse, urlunparse

import msgspec

from specd.desktop.client.answer import Answer, Piece, Settings
from specd.desktop.client.stats_line import stats_line as summary_line
from specd.desktop.commands.launch import ClientSetup, build_client, check_draft_model
from specd.desktop.precision.choice import PrecisionPick
from specd.desktop.precision.measure import settle_precision
from specd.shared.config import Config, default_config_path, load_config_with_origins
from specd.shared.config_origins import Origins, flag_layer
from specd.shared.errors import ConfigError

HELP = "Type a message and press Enter. /new starts a new conversation, /quit leaves (Ctrl+D too)."


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with the model through the verifier",
                       description="Chat through specd: the draft model runs here, the verifier checks it.")
    add_client_options(p)
    p.add_argument("--prompt", help="answer this one prompt and exit (default: interactive)")
    p.add_argument("--json", action="store_true",
                   help="print the answer and its stats as one JSON object on the last line of stdout")
    p.add_argument("--cloud-only", action="store_true", help="no draft model: the verifier generates alone")
    p.set_defaults(handler=run_chat)


def add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file (default: $SPECD_CONFIG, ./config.toml, per-user, /etc/specd)")
    p.add_argument("--host", help="verifier host (overrides [client] server_url)")
    p.add_argument("--port", type=int, help="verifier port")
    p.add_argument("--device", help="where the draft runs: auto, npu, gpu, cpu or an id from `specd devices`")
    p.add_argument("--model-path", help="draft model: a preset, Hugging Face id, folder or .gguf")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int, help="reproducible output for the same seed (-1: fresh each time)")
    p.add_argument("--gamma", help='draft tokens per round: "auto" or a number')
    p.add_argument("--no-pipeline", action="store_true", help="do not draft the next round during verification")


# The flags that override a config key (errors then name the flag, not the file).
CLIENT_FLAG_KEYS = {
    "--model-path": "models.draft", "--temperature": "sampling.temperature", "--top-p": "sampling.top_p",
    "--top-k": "sampling.top_k", "--max-new-tokens": "sampling.max_new_tokens", "--seed": "sampling.seed",
    "--gamma": "speculation.gamma", "--no-pipeline": "speculation.pipeline",
}


def config_from_args(args: argparse.Namespace) -> Config:
    """The config with the flags applied; a draft model that is not there is refused here, before
    anything starts (see :func:`check_draft_model`)."""
    return config_and_origins(args)[0]


def config_and_origins(args: argparse.Namespace, extra_flags: Mapping[str, str] | None = None
                       ) -> tuple[Config, Origins]:
    """:func:`config_from_args` and where each value came from; ``extra_flags`` are a command's own
    flags (``{"--api-port": "api.port"}``)."""
    path = args.config or default_config_path()
    gamma: Any = args.gamma
    if gamma is not None and gamma != "auto":
        try:
            gamma = int(gamma)
        except ValueError:
            raise ConfigError(f'--gamma must be "auto" or a whole number, not {args.gamma!r}') from None
    flags = flag_layer(args, {**CLIENT_FLAG_KEYS, **(extra_flags or {})},
                       {"--gamma": gamma, "--no-pipeline": False if args.no_pipeline else None})
    cfg, origins = load_config_with_origins(path, flags)
    check_draft_model(cfg, origins)
    if args.host or args.port:
        url = urlparse(cfg.client.server_url)
        host = args.host or url.hostname or "127.0.0.1"
        port = args.port or url.port or (443 if url.scheme == "wss" else 8765)
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        cfg = msgspec.structs.replace(cfg, client=msgspec.structs.replace(
            cfg.client, server_url=urlunparse(url._replace(netloc=netloc))))
    return cfg, origins


class Printer:
    """Streams answer text to stdout; tokens produced locally are shown in yellow on a terminal."""

    LOCAL, RESET = "\033[33m", "\033[0m"

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.color = self.stream.isatty()
        self.local = False

    def piece(self, piece: Piece) -> None:
        local = piece.source == "local"
        if local != self.local:
            self.local = local
            if self.color:
                self.stream.write(self.LOCAL if local else self.RESET)
        self.stream.write(piece.text)
        self.stream.flush()

    def end(self) -> None:
        if self.local and self.color:
            self.stream.write(self.RESET)
        self.local = False
        self.stream.write("\n")
        self.stream.flush()


def stats_line(answer: Answer) -> str:
    """The answer's one-line summary (``specd.desktop.client.stats_line``, shared with the window and the bench)."""
    return summary_line(answer.stats.to_json(), answer.finish_reason)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def status(state: str, message: str) -> None:
    say(f"[{state}] {message}")


async def answer_one(setup: ClientSetup, conversation: list[dict[str, str]], settings: Settings,
                     printer: Printer) -> Answer:
    loop = asyncio.get_running_loop()
    cancel_installed = False
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, setup.client.cancel)
        cancel_installed = True
    try:
        answer = await setup.client.chat(conversation, settings, printer.piece)
    finally:
        if cancel_installed:
            loop.remove_signal_handler(signal.SIGINT)
        printer.end()
    return answer


async def chat_async(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not args.json:
        say(f"specd chat · verifier {cfg.client.server_url}")
    setup = await asyncio.to_thread(build_client, cfg, device=args.device, model_path=args.model_path,
                                    progress=say, drafter=not args.cloud_only, on_status=status)
    if setup.choice is not None and not args.json:
        say(setup.choice.summary())
    precision = await settle_precision(setup, cfg, say)
    # Not measured (no verifier yet): measured after an answer once the verifier is reachable.
    remeasure = (lambda: settle_precision(setup, cfg, say)) if precision and precision.source == "default" else None
    settings = setup.settings
    try:
        if args.prompt is not None:
            answer = await answer_one(setup, [{"role": "user", "content": args.prompt}], settings, Printer())
            if args.json:
                print(json.dumps(answer.to_json(), ensure_ascii=False))
            else:
                say(stats_line(answer))
            return 0
        return await interactive(setup, settings, json_lines=args.json, remeasure=remeasure)
    finally:
        await setup.client.close()


async def interactive(setup: ClientSetup, settings: Settings, *, json_lines: bool,
                      remeasure: Callable[[], Awaitable[PrecisionPick | None]] | None = None) -> int:
    read = line_reader()
    conversation: list[dict[str, str]] = []
    say(HELP)
    while True:
        try:
            text = (await read()).strip()
        except (EOFError, KeyboardInterrupt):
            return 0
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/new":
            conversation.clear()
            say("(new conversation)")
            continue
        if text.startswith("/"):
            say(HELP)
            continue
        conversation.append({"role": "user", "content": text})
        answer = await answer_one(setup, conversation, settings, Printer())
        conversation.append({"role": "assistant", "content": answer.text})
        if json_lines:
            print(json.dumps(answer.to_json(), ensure_ascii=False), flush=True)
        else:
            say(stats_line(answer))
        if remeasure is not None and setup.client.connected:
            pick = await remeasure()
            remeasure = remeasure if pick is not None and pick.source == "default" else None


def line_reader():
    """prompt_toolkit with history on a terminal; plain lines from a pipe."""
    if sys.stdin.isatty():
        try:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory

            from specd.shared.paths import state_dir

            folder = state_dir()
            folder.mkdir(parents=True, exist_ok=True)
            session = PromptSession(history=FileHistory(str(folder / "chat_history")))
            return lambda: session.prompt_async("› ")
        except ImportError:
            pass

    async def read() -> str:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            raise EOFError
        return line

    return read


def run_chat(args: argparse.Namespace) -> int:
    return asyncio.run(chat_async(args))
