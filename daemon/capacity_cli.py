"""``specd-verifier capacity``: how many laptops one verifier serves, measured on this device."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from specd.shared.config import default_config_path, load_config
from specd.shared.errors import ConfigError, SpecdError

if TYPE_CHECKING:
    from specd.daemon.capacity import Cell

PROG = "specd-verifier capacity"
log = logging.getLogger("specd.daemon.capacity")


def build_parser() -> argparse.ArgumentParser:
    from specd.daemon.capacity import RECORDINGS, SHAPES

    parser = argparse.ArgumentParser(
        prog=PROG, description="Measure verified tokens/s and p50/p99 round latency against concurrent sessions "
        "and γ for the configured target on its device: speculative sessions replaying recorded draft rounds "
        "at each fixed γ and under the goodput budget, and cloud-only sessions, all batched. Writes a table, "
        "the headline per N (speculative ÷ cloud-only), capacity.json, capacity.md and capacity.png.")
    add = parser.add_argument
    add("--config", metavar="PATH", help="config file (as for specd-verifier)")
    add("--model", help="target model [models] target")
    add("--device", help="auto | cpu | cuda | cuda:N  [server] device")
    add("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="[server] dtype")
    add("--random-weights", action="store_true",
        help="build a randomly initialised model of --shape on the device instead of loading weights")
    add("--shape", choices=sorted(SHAPES), default="llama-3.1-8b", help="architecture for --random-weights")
    add("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], metavar="N",
        help="concurrent sessions to measure (default 1 2 4 8 16 32 64)")
    add("--gamma", type=int, nargs="+", default=[2, 4, 8], metavar="G",
        help="fixed draft tokens per round (default 2 4 8); the budget's sessions offer up to the largest")
    add("--no-budget", action="store_true",
        help="leave out the sessions under the goodput budget (only fixed γ and cloud-only)")
    add("--fresh-population", action="store_true",
        help="start every cell's acceptance from the prior, as a verifier just started; by default the "
        "speculative cells share one population, as one verifier's sessions do, so the budget of a cell "
        "starts from the acceptance of the rounds judged before it")
    add("--tokens", type=int, default=64, metavar="N",
        help="new tokens each session generates at least; those done first go on with another request until "
             "every session has them (default 64)")
    add("--repeat", type=int, default=1, metavar="K",
        help="measure each N's cells K times, every mode and γ in turn within each pass, and combine each "
        "cell's passes (default 1): a slow minute of the machine then weighs on every side of a ratio alike")
    add("--modes", nargs="+", choices=("speculative", "cloud"), default=["speculative", "cloud"])
    add("--one-session-per-forward", action="store_true",
        help="also measure every mode unbatched (one session per forward), for the batching speedup")
    add("--max-batch-tokens", type=int, metavar="N", help="[limits] max_batch_tokens")
    add("--drafts", choices=sorted(RECORDINGS), default="int4",
        help="which shipped recording of the SmolLM2 edge draft's rounds to replay: int4 (default; acceptance "
        "0.44-0.64, near a 1B → 8B pair's) or int8 (what draft precision auto picks on a CPU)")
    add("--recording", type=Path, metavar="PATH", help="recorded draft rounds to replay instead of --drafts")
    add("--threads", type=int, metavar="N", help="torch intra-op CPU threads")
    add("--out", type=Path, default=Path("capacity"), metavar="DIR", help="output folder (default ./capacity)")
    return parser


def capacity_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return asyncio.run(_run(args, argv))
    except (ConfigError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SpecdError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from specd.daemon.capacity import RECORDINGS, calibrated_cost, combine, load_recording, measure, random_target
    from specd.daemon.capacity_report import headline_table, table, write_outputs
    from specd.daemon.goodput import Acceptance
    from specd.daemon.target import TargetModel, resolve_device, resolve_dtype

    if min(args.sessions) < 1 or min(args.gamma) < 1 or args.tokens < 1 or args.repeat < 1:
        raise ConfigError("--sessions, --gamma, --tokens and --repeat must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    overrides = {"server": {"device": args.device, "dtype": args.dtype}, "models": {"target": args.model},
                 "limits": {"max_batch_tokens": args.max_batch_tokens}}
    config = load_config(args.config or default_config_path(), overrides)
    recording_path = args.recording or RECORDINGS[args.drafts]
    meta_rec, recording = load_recording(recording_path)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specd-model")
    loop = asyncio.get_running_loop()
    if args.random_weights:
        device = resolve_device(config.server.device)
        dtype = resolve_dtype(config.server.dtype, device)
        log.info("building a randomly initialised %s on %s (%s)", args.shape, device, dtype)
        target = await loop.run_in_executor(executor, random_target, args.shape, device, dtype)
    else:
        target = await loop.run_in_executor(executor, TargetModel.load, config, log.info)
    if max(max(r.drafts) for s in recording for r in s.rounds) >= target.vocab_size:
        raise ConfigError(f"--recording {recording_path}: its token ids exceed {target.name}'s vocabulary")
    parts: dict[tuple[str, bool, int, int, bool], list[Cell]] = {}
    # Every mode takes its turn at each N (and batched beside unbatched), so a change in the machine's load
    # hits the sides of each ratio alike.
    budget = "speculative" in args.modes and not args.no_budget
    cost = None
    if budget:
        cost = await calibrated_cost(target, sessions=max(args.sessions), gamma=max(args.gamma),
                                     max_batch_tokens=config.limits.max_batch_tokens, executor=executor)
    plan = [(mode, batched, n, g, False) for n in args.sessions for mode in args.modes
            for g in (args.gamma if mode == "speculative" else [0])
            for batched in ((True, False) if args.one_session_per_forward else (True,))]
    if budget:
        plan = [p for n in args.sessions for p in
                [*(q for q in plan if q[2] == n), ("speculative", True, n, max(args.gamma), True)]]
    plan = [p for n in args.sessions for _pass in range(args.repeat) for p in plan if p[2] == n]
    # One verifier process serves one load after another: every speculative cell's rounds join the same
    # pooled acceptance, which a session of the budget starts from (unless --fresh-population).
    population = None if args.fresh_population else Acceptance.pooled()
    for i, (mode, batched, n, gamma, under_budget) in enumerate(plan, 1):
        what = f"{mode}{'' if batched else ' (one session per forward)'}, {n} session(s)" + \
               (f" under the goodput budget, γ ≤ {gamma}" if under_budget else f", γ={gamma}" if gamma else "")
        log.info("[%d/%d] %s", i, len(plan), what)
        began = time.monotonic()
        cell = await measure(target, recording, mode=mode, batched=batched, sessions=n, gamma=gamma or 1,
                             tokens=args.tokens, max_batch_tokens=config.limits.max_batch_tokens, executor=executor,
                             budget=under_budget, cost=cost, population=population)
        parts.setdefault((mode, batched, n, gamma, under_budget), []).append(cell)
        log.info("      %.1f tokens/s in all, p99 %.0f ms (%.1f s)", cell.aggregate_tps, cell.p99_ms,
                 time.monotonic() - began)
    cells = [combine(repeats) for repeats in parts.values()]
    meta = {"target": target.name, "device": str(target.device), "dtype": str(target.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "tokens": args.tokens, "recording": str(recording_path.name),
            "recorded_draft": meta_rec.get("draft", "?"), "recorded_gamma": meta_rec.get("gamma", "?"),
            "max_batch_tokens": config.limits.max_batch_tokens, "shared_population": population is not None,
            "repeat": args.repeat,
            "command": "specd-verifier capacity " + " ".join(argv)}
    print(table(cells))
    print()
    print(headline_table(cells))
    for path in write_outputs(cells, meta, args.out):
        print(f"wrote {path}", file=sys.stderr)
    executor.shutdown(wait=False)
    return 0
