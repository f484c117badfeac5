"""``specd demo`` (what ``make demo`` runs): the product end to end on this machine.

Starts a verifier daemon on the configured target (the embedded SmolLM2 by default), prepares the
draft model on the best local device meanwhile, settles the draft's precision against the verifier
(``auto``: the candidates measured on a first run, the recorded choice later), then answers a few
prompts speculatively with streaming output and once more cloud-only, and reports the speedup measured
in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import replace

from specd.desktop.client.answer import Answer
from specd.desktop.commands.chat import Printer, add_client_options, config_from_args, say, stats_line
from specd.desktop.commands.launch import build_client
from specd.desktop.commands.local_verifier import LocalVerifier
from specd.desktop.precision.measure import settle_precision
from specd.shared.config import to_dict
from specd.shared.models import ensure_hf_folder

PROMPTS = (
    "Explain in three sentences why the sky is blue.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Give me three tips for a productive morning.",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run specd end to end on this machine (local verifier + edge drafter)",
                       description="Start a local verifier, chat a few prompts through the edge drafter and "
                                   "compare with cloud-only generation in the same run.")
    add_client_options(p)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), choices=range(1, len(PROMPTS) + 1),
                   help="how many of the built-in prompts to run (default: %(default)s)")
    p.set_defaults(handler=run_demo, temperature_default=0.0, max_new_tokens_default=96)


def say_between_bars(message: str) -> None:
    """A progress line that does not break a progress bar being drawn (transformers' tqdm bars, while
    the verifier's lines arrive from its own process)."""
    try:
        from tqdm import tqdm
    except ImportError:
        say(message)
        return
    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


def split_cores() -> tuple[set[int] | None, set[int] | None, str]:
    """Give the verifier and the edge separate cores when they share this machine."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None, "the verifier and the edge share this machine's cores"
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None, "one core: the verifier and the edge take turns"
    half = len(cores) // 2
    edge, verifier = set(cores[:half]), set(cores[half:])
    return verifier, edge, (f"verifier pinned to cores {sorted(verifier)}, edge drafter to {sorted(edge)} "
                            "(they share this machine)")


async def demo_async(args: argparse.Namespace) -> int:
    if args.temperature is None:
        args.temperature = args.temperature_default  # greedy: the speculative text must equal cloud-only's
    if args.max_new_tokens is None:
        args.max_new_tokens = args.max_new_tokens_default
    cfg = config_from_args(args)
    started = time.perf_counter()
    verifier_cpus, edge_cpus, pinning = split_cores()
    say(f"specd demo · target {cfg.models.target} · draft {cfg.models.draft} · {pinning}")
    # Prepared here, once, with its progress on this terminal; the verifier then finds it in the cache
    # (as does the draft, when it is the same model: the embedded pair), instead of both building it.
    await asyncio.to_thread(ensure_hf_folder, cfg.models.target, cache_override=cfg.models.cache_dir,
                            progress=say_between_bars)
    overrides = {k: v for k, v in to_dict(cfg).items() if k in ("models", "limits")}
    verifier = LocalVerifier(overrides=overrides | {"server": {"device": cfg.server.device}},
                             cpus=verifier_cpus, threads=len(verifier_cpus) if verifier_cpus else None,
                             progress=say_between_bars)
    if edge_cpus:
        os.sched_setaffinity(0, edge_cpus)
    import torch

    torch.set_num_threads(len(edge_cpus) if edge_cpus else max(1, (os.cpu_count() or 2) // 2))
    say("Preparing the draft model and starting the verifier…")
    serving = asyncio.create_task(verifier.start())
    try:
        setup = await asyncio.to_thread(build_client, cfg, device=args.device, progress=say_between_bars)
        await serving
        say(f"Verifier ready at {verifier.url} ({time.perf_counter() - started:.0f} s so far)")
        if setup.choice is not None:
            say(setup.choice.summary())
        client = setup.client
        client.endpoint = replace(client.endpoint, url=verifier.url)
        # On a first run this builds the other candidate drafts and measures them (a few short prompts).
        await settle_precision(setup, cfg, say_between_bars)
        cloud = (await asyncio.to_thread(build_client, cfg, drafter=False, url=verifier.url)).client
        settings = setup.settings
        if settings.seed is None:
            settings = replace(settings, seed=1234)  # the same draws for both runs of a prompt
        rows: list[tuple[Answer, Answer]] = []
        for number, prompt in enumerate(PROMPTS[: args.prompts], 1):
            print(f"\n\033[1m[{number}] {prompt}\033[0m" if sys.stdout.isatty() else f"\n[{number}] {prompt}")
            conversation = [{"role": "user", "content": prompt}]
            printer = Printer()
            spec = await client.chat(conversation, settings, printer.piece)
            printer.end()
            say(f"  speculative: {stats_line(spec)}")
            base = await cloud.chat(conversation, settings)
            say(f"  cloud-only:  {stats_line(base)}")
            rows.append((spec, base))
        await client.close()
        await cloud.close()
    finally:
        if not serving.done():
            serving.cancel()
        await verifier.stop()
    print(summary(rows, greedy=settings.sampling.greedy))
    drafter = setup.client.drafter
    if speedup(rows) < 1.2 and drafter is not None and cfg.models.draft_precision not in ("auto", "int8"):
        say(f'Tip: [models] draft_precision = "{cfg.models.draft_precision}" is set; "auto" (the default) builds '
            "the candidate drafts, measures each against the verifier and keeps the fastest (on a 2-core CPU "
            "int8 was 2.4x faster than cloud-only, BENCHMARKS.md).")
    say(f"Demo finished in {time.perf_counter() - started:.0f} s.")
    return 0


def speedup(rows: list[tuple[Answer, Answer]]) -> float:
    """Speculative tokens per second over cloud-only's, over all prompts."""
    spec = sum(s.stats.generated for s, _ in rows) / max(1e-9, sum(s.stats.total_ms for s, _ in rows))
    base = sum(b.stats.generated for _, b in rows) / max(1e-9, sum(b.stats.total_ms for _, b in rows))
    return spec / base if base else 0.0


def summary(rows: list[tuple[Answer, Answer]], *, greedy: bool) -> str:
    spec_tokens = sum(s.stats.generated for s, _ in rows)
    spec_ms = sum(s.stats.total_ms for s, _ in rows)
    base_tokens = sum(b.stats.generated for _, b in rows)
    base_ms = sum(b.stats.total_ms for _, b in rows)
    spec_rate = spec_tokens / (spec_ms / 1000) if spec_ms else 0.0
    base_rate = base_tokens / (base_ms / 1000) if base_ms else 0.0
    drafted = sum(s.stats.drafted for s, _ in rows)
    accepted = sum(s.stats.accepted for s, _ in rows)
    lines = ["", "Summary (measured in this run)",
             f"  speculative: {spec_tokens} tokens in {spec_ms / 1000:.1f} s = {spec_rate:.1f} tok/s, "
             f"acceptance {accepted / drafted if drafted else 0:.0%}",
             f"  cloud-only:  {base_tokens} tokens in {base_ms / 1000:.1f} s = {base_rate:.1f} tok/s",
             f"  speedup:     {speedup(rows):.2f}x"]
    if greedy:
        same = sum(s.token_ids == b.token_ids for s, b in rows)
        lines.append(f"  identical to cloud-only (greedy): {same} of {len(rows)} answers")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    return asyncio.run(demo_async(args))
