"""``specd-verifier``: the verifier daemon's command line (also ``python -m specd.daemon``).

Every flag has a config.toml key ([server] or [limits]); flags override the file. Errors are one line
on stderr: exit status 2 for configuration and usage, 1 when the model cannot be prepared or loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from specd.daemon.client_keys import with_keys_file
from specd.shared import __version__
from specd.shared.config import default_config_path, load_config, load_config_with_origins
from specd.shared.config_origins import ConfigLayer, Origins, flag_layer
from specd.shared.errors import ConfigError, SpecdError

PROG = "specd-verifier"
log = logging.getLogger("specd.daemon")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="The specd verifier: serves a target model to specd edge clients over WebSocket "
        "(docs/protocol.md), with GET /healthz and GET /metrics on the same port. "
        "`specd-verifier capacity --help`: how many sessions this target serves on this device. "
        "`specd-verifier keys --help`: named client keys, their limits and usage.",
        epilog="Each flag overrides the config file's key named in brackets. Client keys: one per client in "
        "--keys-file (`specd-verifier keys add NAME`), plus the key named 'default' from the environment variable "
        "named by [server] api_key_env (default SPECD_API_KEY) or --api-key-file. SIGHUP re-reads the keys file.")
    add = parser.add_argument
    add("--config", metavar="PATH", help="config file (default: $SPECD_CONFIG, ./config.toml, the user config "
        "folder, /etc/specd/config.toml)")
    add("--host", help="address to listen on [server] host (default 127.0.0.1; anything else needs an API "
        "key or --insecure-no-auth)")
    add("--port", type=int, help="TCP port [server] port (default 8765; 0 picks a free one, see --port-file)")
    add("--model", help="target model [models] target: a preset, a Hugging Face id, a folder or a .gguf file")
    add("--device", help="auto | cpu | cuda | cuda:N  [server] device (auto: the first GPU, else the CPU)")
    add("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
        help="weights dtype [server] dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    add("--max-sessions", type=int, metavar="N", help="concurrent sessions [limits] max_sessions")
    add("--max-input-tokens", type=int, metavar="N", help="longest prompt [limits] max_input_tokens")
    add("--max-total-tokens", type=int, metavar="N",
        help="prompt + generated tokens per request, bounds each KV cache [limits] max_total_tokens")
    add("--max-draft", type=int, metavar="N", help="most draft tokens per round [limits] max_draft")
    add("--max-frame-bytes", type=int, metavar="N", help="largest WebSocket frame [limits] max_frame_bytes")
    add("--idle-timeout", type=float, metavar="SECONDS",
        help="close sessions idle this long [limits] idle_timeout_s")
    add("--max-batch-tokens", type=int, metavar="N",
        help="most tokens one target forward runs, prefill chunks included [limits] max_batch_tokens")
    add("--kv-cache-gib", type=float, metavar="GIB",
        help="KV memory for all sessions (0: max_sessions x max_total_tokens) [limits] kv_cache_gib")
    add("--no-batching", dest="batching", action="store_false", default=None,
        help="one session per target forward, for comparisons [server] batching = false")
    add("--api-key-file", metavar="PATH", help="file whose first line is the API key [server] api_key_file")
    add("--keys-file", metavar="PATH", help="named client keys (`specd-verifier keys --help`) [server] keys_file "
        "(default: keys.toml beside the config file)")
    add("--tls-cert", metavar="PEM", help="certificate chain to serve wss:// [server] tls_cert")
    add("--tls-key", metavar="PEM", help="private key for --tls-cert [server] tls_key")
    add("--insecure-no-auth", action="store_true", default=None,
        help="allow a non-loopback --host without an API key [server] insecure_no_auth")
    add("--log-level", choices=("debug", "info", "warning", "error"), help="[server] log_level")
    add("--threads", type=int, metavar="N",
        help="torch intra-op CPU threads (default: torch's choice; pin it when sharing a machine)")
    add("--port-file", metavar="PATH", help="write the bound port to PATH once serving (for --port 0)")
    add("--ray", metavar="ADDRESS", help="run as a Ray Serve application on the Ray cluster at ADDRESS (auto, "
        "HOST:6379 or ray://HOST:10001) instead of serving here; --host/--port set Serve's HTTP proxy; "
        "needs the 'cluster' extra (see packaging/ray/serve.yaml)")
    add("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# Each flag and the config key it overrides (errors then name the flag, not the file).
FLAG_KEYS = {
    "--host": "server.host", "--port": "server.port", "--device": "server.device", "--dtype": "server.dtype",
    "--api-key-file": "server.api_key_file", "--keys-file": "server.keys_file",
    "--tls-cert": "server.tls_cert", "--tls-key": "server.tls_key",
    "--insecure-no-auth": "server.insecure_no_auth", "--log-level": "server.log_level",
    "--no-batching": "server.batching", "--model": "models.target",
    "--max-sessions": "limits.max_sessions", "--max-input-tokens": "limits.max_input_tokens",
    "--max-total-tokens": "limits.max_total_tokens", "--max-draft": "limits.max_draft",
    "--max-frame-bytes": "limits.max_frame_bytes", "--idle-timeout": "limits.idle_timeout_s",
    "--max-batch-tokens": "limits.max_batch_tokens", "--kv-cache-gib": "limits.kv_cache_gib",
}


def overrides_from(args: argparse.Namespace) -> ConfigLayer:
    return flag_layer(args, FLAG_KEYS, converted={"--no-batching": args.batching})


def main(argv: list[str] | None = None) -> int:
    # Until the event loop takes over the signals, a SIGTERM (a stop during start-up) is a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["capacity"]:
        from specd.daemon.capacity_cli import capacity_main

        return capacity_main(argv[1:])
    if argv[:1] == ["keys"]:
        from specd.daemon.keys_cli import keys_main

        return keys_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        path = args.config or default_config_path()
        layers = []
        if args.max_draft is not None:
            # [speculation] is the edge's business; keep its cross-check with max_draft from failing here.
            spec = load_config(path).speculation
            gamma_max = min(spec.gamma_max, args.max_draft)
            gamma = spec.gamma if spec.gamma == "auto" or spec.gamma <= gamma_max else gamma_max
            layers.append({"speculation": {"gamma_max": gamma_max, "gamma": gamma}})
        config, origins = load_config_with_origins(path, overrides_from(args), layers)
        config = with_keys_file(config, path)
        if args.threads is not None and args.threads < 1:
            raise ConfigError("--threads must be at least 1")
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from specd.daemon.notify import setup_logging

    setup_logging(config.server.log_level)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if path:
        log.info("config: %s", path)
    if args.ray:
        return _serve_on_ray(args.ray, config, args.threads)
    try:
        interrupted = asyncio.run(_serve(config, origins, Path(args.port_file) if args.port_file else None))
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SpecdError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    if interrupted:
        # Stopped while the model was still loading: that thread cannot be interrupted, so do not
        # wait for it (systemd's stop timeout would) — nothing is being served yet.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _serve_on_ray(address: str, config: Any, threads: int | None) -> int:
    try:
        from specd.daemon.ray_serve import serve_on_cluster
    except ImportError as exc:
        print(f"{PROG}: error: --ray needs Ray Serve ({exc.name} is missing): pip install 'specd[cluster]'",
              file=sys.stderr)
        return 2
    try:
        serve_on_cluster(address, config, threads)
    except SpecdError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


async def _serve(config: Any, origins: Origins, port_file: Path | None) -> bool:
    """Serve until SIGTERM/SIGINT; True when stopped before the model finished loading."""
    from specd.daemon.notify import Notifier
    from specd.daemon.server import Verifier

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier = Notifier()
    verifier = Verifier(config, notifier=notifier, origins=origins)
    reloads: set[asyncio.Task] = set()  # held until done (the loop keeps only weak references to tasks)

    def reload_keys() -> None:  # SIGHUP: systemctl reload specd-verifier
        task = loop.create_task(verifier.reload_keys())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    if hasattr(signal, "SIGHUP"):  # not on Windows
        loop.add_signal_handler(signal.SIGHUP, reload_keys)
    starting = loop.create_task(verifier.start())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("stopping before the model finished loading")
        notifier.notify("STOPPING=1")
        starting.cancel()
        return True
    stopping.cancel()
    try:
        starting.result()
    except SpecdError as exc:
        notifier.notify(f"STATUS=failed: {exc}")
        raise
    if port_file is not None:
        _write_port_file(port_file, verifier.port)
    await stop.wait()
    await verifier.stop()
    return False


def _write_port_file(path: Path, port: int) -> None:
    """Atomically, so a script polling for the file never reads it half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
