"""``specd serve``: the edge client behind an OpenAI- and Ollama-compatible HTTP API on this machine.

Apps that talk to a local model server (editors, chat front ends, the ``openai`` package) point at
``http://127.0.0.1:11435/v1`` (or ``/api`` for Ollama's API) and get the target model's answers, drafted
here and verified by the verifier, with the local fallback and draft device of ``specd chat``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from specd.desktop.commands.chat import add_client_options, config_and_origins
from specd.desktop.commands.launch import build_client
from specd.desktop.precision.measure import settle_precision
from specd.shared.errors import SpecdError

# `specd serve`'s own flags and the [api] keys they override.
API_FLAG_KEYS = {"--api-host": "api.host", "--api-port": "api.port", "--max-concurrent": "api.max_concurrent"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model to other apps: OpenAI- and Ollama-compatible HTTP API",
                       description="Serve specd on this machine as an OpenAI-compatible (/v1) and Ollama-compatible "
                                   "(/api) HTTP API. --host and --port are the verifier's, as in `specd chat`.")
    add_client_options(p)
    p.add_argument("--api-host", help="address to listen on (default [api] host, 127.0.0.1; others need a key)")
    p.add_argument("--api-port", type=int, help="port to listen on (default [api] port, 11435; 0: a free port)")
    p.add_argument("--max-concurrent", type=int, help="answers at once (default [api] max_concurrent)")
    p.add_argument("--cloud-only", action="store_true", help="no draft model: the verifier generates alone")
    p.set_defaults(handler=run_serve)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def serve_async(args: argparse.Namespace) -> int:
    try:
        from specd.desktop.serve.service import api_key, start_local_api
    except ImportError as exc:  # starlette and uvicorn come with the desktop extra
        raise SpecdError(f"specd serve needs {exc.name or 'its HTTP server'}: pip install 'specd[desktop]'") from None

    cfg, origins = config_and_origins(args, API_FLAG_KEYS)
    api_key(cfg, origins)  # refuse an exposed server without a key before loading any model
    say(f"specd serve · verifier {cfg.client.server_url}")
    setup = await asyncio.to_thread(build_client, cfg, device=args.device, progress=say,
                                    drafter=not args.cloud_only, on_status=lambda state, msg: say(f"[{state}] {msg}"))
    if setup.choice is not None:
        say(setup.choice.summary())
    await settle_precision(setup, cfg, say)
    api = await start_local_api(cfg, origins, device=args.device, drafter=not args.cloud_only, progress=say,
                                first=setup)
    say(f"OpenAI API: {api.url}/v1 · Ollama API: {api.url}/api · model {api.state.model!r} · "
        f"up to {cfg.api.max_concurrent} answers at once · Ctrl+C stops")
    print(f"{api.url}/v1", flush=True)  # the one line on stdout: scripts read the base URL from it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        waiter = asyncio.create_task(api.server.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
    finally:
        say("stopping")
        await api.stop()
    return 0


def run_serve(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve_async(args))
    except KeyboardInterrupt:  # Windows: no signal handlers on the loop
        return 0
