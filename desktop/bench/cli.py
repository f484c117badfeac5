"""``specd bench``: measure every mode side by side and write JSON, a Markdown report and PNG plots."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

import msgspec

from specd.desktop.bench.figures import DEFAULT_MODES, MODES
from specd.desktop.bench.prompts import PROMPT_SETS, PROMPTS, select_prompts
from specd.desktop.client.answer import Settings
from specd.shared.config import Config, default_config_path, load_config, to_dict
from specd.shared.config_origins import flag_layer
from specd.shared.errors import ConfigError, SpecdError

# Round trips a user meets, from a local verifier to another continent: speculation must not lose to
# cloud-only at any of them.
DEFAULT_RTTS_MS = (0.0, 20.0, 50.0, 100.0, 200.0)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure speed against cloud-only, side by side",
                       description="Run cloud-only, edge-only and speculative decoding (fixed γ, adaptive γ, "
                                   "adaptive + pipelined) on the same prompts and seeds, at emulated network "
                                   "round trips, and write a JSON file, a Markdown report and PNG plots. "
                                   "See docs/bench.md.")
    p.add_argument("--config", help="config file (default: $SPECD_CONFIG, ./config.toml, per-user, /etc/specd)")
    p.add_argument("--num-prompts", type=int, default=5, metavar="N",
                   help=f"prompts from the built-in set of {len(PROMPTS)} (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=2, metavar="N", help="runs per prompt and mode (default: 2)")
    p.add_argument("--host", help="a running verifier's host (default: start a local verifier)")
    p.add_argument("--port", type=int, help="a running verifier's port")
    p.add_argument("--device", nargs="+", metavar="DEVICE",
                   help="edge device(s) for the draft: auto, npu, gpu, cpu or ids from `specd devices`; "
                        "several are compared")
    p.add_argument("--model-path", help="draft model: a preset, Hugging Face id, folder or .gguf")
    p.add_argument("--rtt-ms", nargs="+", type=float, default=None, metavar="MS",
                   help="added network round trip(s), emulated by a delaying proxy on loopback (default: "
                        f"{' '.join(f'{r:g}' for r in DEFAULT_RTTS_MS)})")
    p.add_argument("--prompts", nargs="+", choices=list(PROMPT_SETS), default=["standard"], metavar="SET",
                   help="prompt sets, reported side by side: standard (diverse questions), copy (answers that repeat "
                        "the conversation: code edits, corrections, questions from a text, follow-ups) "
                        "(default: standard)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES), metavar="MODE",
                   help=f"modes to run (default: {', '.join(DEFAULT_MODES)}); also spec-no-context (spec-pipelined "
                        "without the context proposer)")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round for spec-fixed (default: 4)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the config's)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-new-tokens", type=int, default=64, help="per answer (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1234, help="base seed; every mode gets the same seed per answer")
    p.add_argument("--sessions", nargs="+", type=int, default=[1, 4, 8], metavar="N",
                   help="concurrent edge clients for the multi-session figure (default: 1 4 8; 0 skips it)")
    p.add_argument("--verifier-threads", type=int, help="torch threads of the local verifier (default: its cores)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the local verifier and the edge to separate cores")
    p.add_argument("--no-hf-assisted", action="store_true",
                   help="skip the comparison with transformers' assisted generation")
    p.add_argument("--no-warmup", action="store_true", help="measure the very first answers too")
    p.add_argument("--json", type=Path, help="where to write the JSON (default: OUT/bench.json)")
    p.add_argument("--out", type=Path, help="folder for the report and plots (default: ./specd-bench-<time>)")
    p.add_argument("--title", default="", help="a title for the report")
    p.set_defaults(handler=run_bench)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_config(args: argparse.Namespace) -> tuple[Config, str | None]:
    """The config with the flags applied, and the remote verifier's URL (None: start one locally)."""
    path = args.config or default_config_path()
    flags = {"--temperature": "sampling.temperature", "--top-p": "sampling.top_p",
             "--max-new-tokens": "sampling.max_new_tokens", "--seed": "sampling.seed"}
    cfg = load_config(path, overrides=flag_layer(args, flags))
    if not (args.host or args.port):
        return cfg, None
    url = urlparse(cfg.client.server_url)
    host = args.host or url.hostname or "127.0.0.1"
    port = args.port or url.port or (443 if url.scheme == "wss" else 8765)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    remote = urlunparse(url._replace(netloc=netloc))
    return msgspec.structs.replace(cfg, client=msgspec.structs.replace(cfg.client, server_url=remote)), remote


def check_args(args: argparse.Namespace) -> None:
    if not 1 <= args.num_prompts <= len(PROMPTS):
        raise ConfigError(f"--num-prompts must be between 1 and {len(PROMPTS)}, got {args.num_prompts}")
    if args.iterations < 1:
        raise ConfigError(f"--iterations must be at least 1, got {args.iterations}")
    if args.gamma < 1:
        raise ConfigError(f"--gamma must be at least 1, got {args.gamma}")
    if args.rtt_ms and any(r < 0 for r in args.rtt_ms):
        raise ConfigError("--rtt-ms values must be >= 0")
    if any(n < 0 for n in args.sessions):
        raise ConfigError("--sessions values must be >= 0")


def bench_rtts(args: argparse.Namespace) -> tuple[float, ...]:
    """The round trips to measure at: ``--rtt-ms``, else :data:`DEFAULT_RTTS_MS`."""
    return tuple(args.rtt_ms) if args.rtt_ms else DEFAULT_RTTS_MS


def pin_this_process(cpus: set[int]) -> None:
    """Pin every thread of this process (and the threads it starts later) to ``cpus``."""
    tasks = Path("/proc/self/task")
    ids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]
    for tid in ids:
        with contextlib.suppress(OSError):  # a thread may have ended meanwhile
            os.sched_setaffinity(tid, cpus)
    os.sched_setaffinity(0, cpus)


def machine() -> str:
    from specd.desktop.drafters.devices import cpu_name

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = 0.0
    import torch

    return (f"{cpu_name()}, {os.cpu_count()} logical cores, {memory:.0f} GiB RAM; {platform.platform()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def run_bench(args: argparse.Namespace) -> int:
    check_args(args)
    return asyncio.run(bench_async(args))


async def bench_async(args: argparse.Namespace) -> int:
    from specd.desktop.bench.plots import write_plots
    from specd.desktop.bench.report import build_report, markdown, write_json
    from specd.desktop.bench.runner import BenchPlan, BenchRunner
    from specd.desktop.commands.demo import split_cores
    from specd.desktop.commands.local_verifier import LocalVerifier

    cfg, remote = bench_config(args)
    started = dt.datetime.now().astimezone()
    out = args.out or Path(f"specd-bench-{started:%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    rtts = bench_rtts(args)
    settings = replace(Settings.from_config(cfg), seed=args.seed, max_new_tokens=args.max_new_tokens)
    prompts = select_prompts(args.num_prompts, tuple(args.prompts))
    plan = BenchPlan(prompts=prompts, settings=settings, modes=tuple(args.modes),
                     rtts_ms=rtts, iterations=args.iterations, devices=tuple(args.device or [None]),
                     gamma=args.gamma, sessions=tuple(n for n in args.sessions if n > 0),
                     warmup=not args.no_warmup, model_path=args.model_path)
    verifier_cpus = edge_cpus = None
    if remote:
        pinning = f"remote verifier at {remote}; the edge uses this machine's cores"
    elif args.no_pin:
        pinning = "verifier and edge share this machine's cores (not pinned: --no-pin)"
    else:
        verifier_cpus, edge_cpus, pinning = split_cores()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    verifier = None
    if not remote:
        threads = args.verifier_threads or (len(verifier_cpus) if verifier_cpus else None)
        overrides = {k: v for k, v in to_dict(cfg).items() if k in ("models", "limits")}
        verifier = LocalVerifier(args.config, overrides=overrides | {"server": {"device": cfg.server.device}},
                                 cpus=verifier_cpus, threads=threads, progress=say)
        pinning += f"; verifier torch threads: {threads or 'default'}"
    if edge_cpus:
        pin_this_process(edge_cpus)
    import torch

    torch.set_num_threads(len(edge_cpus) if edge_cpus else max(1, (os.cpu_count() or 2) // 2))
    rtt_text = ", ".join(f"{r:g}" for r in rtts)
    say(f"specd bench · {plan.answers()} answers · modes {', '.join(plan.modes)} · RTT {rtt_text} ms · {pinning}")
    try:
        if verifier is not None:
            await verifier.start()
            url = verifier.url
        else:
            url = remote
        runner = BenchRunner(cfg, plan, url, say=say)
        result = await runner.run()
    finally:
        if verifier is not None:
            await verifier.stop()
    hf = None
    if not args.no_hf_assisted:
        hf = await asyncio.to_thread(hf_assisted, cfg, args, remote, verifier_cpus)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta = {
        "title": args.title or "speculative decoding against its baselines",
        "command": "specd bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "started": started.isoformat(timespec="seconds"), "machine": machine(), "pinning": pinning,
        "target": cfg.models.target, "draft": draft_description(cfg, args.model_path, result.devices),
        "settings": (f"temperature {settings.sampling.temperature:g}, top-p {settings.sampling.top_p:g}, "
                     f"max {settings.max_new_tokens} new tokens, seed {args.seed}, spec-fixed γ = {args.gamma}, "
                     f"γ_max {settings.gamma_max}, proposal top-K {settings.support_k}"),
        "prompts": ", ".join(p.id for p in plan.prompts), "iterations": plan.iterations,
        "network": ("a delaying TCP proxy on loopback adds the RTT (half each way) to every verifier exchange"
                    if not remote or any(rtts) else "the real network to the remote verifier"),
        "load_average_before": load_before, "load_average_after": load_after,
        "config": to_dict(cfg),
    }
    report = build_report(result, meta, hf)
    plots = write_plots(report, out)
    write_json(report, args.json or out / "bench.json")
    (out / "report.md").write_text(markdown(report, plots), encoding="utf-8")
    print(summary(report))
    say(f"Wrote {args.json or out / 'bench.json'}, {out / 'report.md'} and {len(plots)} plot(s) in {out}")
    return 0


def draft_description(cfg: Config, model_path: str | None, devices: list[Any]) -> str:
    """``smollm2-135m-instruct (auto, draft_precision auto: int8 on onnxruntime-genai:cpu)``."""
    chosen = [f"{d.detail['draft_precision']} on {d.label}" for d in devices if d.detail.get("draft_precision")]
    precision = cfg.models.draft_precision + (f": {', '.join(chosen)}" if chosen else "")
    return f"{model_path or cfg.models.draft} ({cfg.models.draft_backend}, draft_precision {precision})"


def hf_assisted(cfg: Config, args: argparse.Namespace, remote: str | None, cpus: set[int] | None) -> dict[str, Any]:
    """transformers' assisted generation on this machine, in a child process on the verifier's cores."""
    if remote:
        return {"error": "the verifier is remote, so its target is not on this machine"}
    from specd.shared.models import ensure_hf_folder

    try:
        target = ensure_hf_folder(cfg.models.target, cache_override=cfg.models.cache_dir)
        draft = ensure_hf_folder(args.model_path or cfg.models.draft, cache_override=cfg.models.cache_dir)
    except SpecdError as exc:
        return {"error": f"needs both models as Hugging Face (torch) folders: {exc}"}
    threads = args.verifier_threads or (len(cpus) if cpus else max(1, (os.cpu_count() or 2) // 2))
    say("Measuring transformers' assisted generation (one process) for comparison…")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "hf.json"
        command = [sys.executable, "-m", "specd.desktop.bench.hf_assisted", "--target", str(target),
                   "--draft", str(draft), "--prompts", str(min(args.num_prompts, 3)),
                   "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(cfg.sampling.temperature),
                   "--top-p", str(cfg.sampling.top_p), "--seed", str(args.seed), "--threads", str(threads),
                   "--json", str(path)]
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        done = subprocess.run(command, preexec_fn=pin, capture_output=True, text=True, timeout=1800)
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        return {"error": f"the comparison failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}"}


def summary(report: dict) -> str:
    lines = ["", "Summary (speedup against cloud-only, same run)"]
    for device, rtts in report["by_rtt"].items():
        for rtt, cells in rtts.items():
            parts = []
            for mode, fig in cells.items():
                text = f"{mode} {fig['tokens_per_second']:.1f} tok/s"
                if fig.get("speedup") is not None and mode != "cloud-only":
                    text += f" ({fig['speedup']:.2f}×)"
                if fig.get("assessment") and mode.startswith("spec"):
                    text += f" acc {fig['acceptance_rate']:.0%} {fig['assessment']}"
                parts.append(text)
            lines.append(f"  {device} @ +{rtt} ms: " + "; ".join(parts))
    if report.get("worst_cell_summary"):
        lines.append(f"  {report['worst_cell_summary']}")
    return "\n".join(lines)
