"""Fresh `specd chat` processes against one verifier: what a new user's first answer gets.

Each answer is a new process (`specd chat --prompt … --max-new-tokens 64 --json`), so nothing learnt by an
earlier answer helps: the mode chooser starts from its priors (the draft precision record) and the
handshake's round trip. Cloud-only (`--cloud-only`) and the default take turns, answer by answer, with the
same seed, against one verifier pinned to the second core (one torch thread) through a loopback proxy that
adds each round trip; the chat processes run on the first core, as `specd bench` places them.

    python benchmarks/chat_fresh.py --runs 10 --rtt-ms 0 50 --out benchmarks/smollm2-2core-chooser/chat-fresh.md

The report gives, per round trip, every answer's tokens per second, and the slowest default answer against
cloud-only's median (issue 27 asks ≥ 1.5×), with the tokens each default answer streamed and its decision trace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from specd.desktop.bench.netem import ThreadedProxy
from specd.desktop.commands.demo import split_cores
from specd.desktop.commands.local_verifier import LocalVerifier

PROMPT = "Explain in a few sentences how a refrigerator keeps food cold."


def chat(port: int, *, cloud_only: bool, seed: int, tokens: int, cpus: set[int] | None,
         device: str | None) -> dict:
    """One fresh `specd chat` process; its answer's JSON (the last line of stdout)."""
    command = [sys.executable, "-m", "specd.desktop.cli", "chat", "--host", "127.0.0.1", "--port", str(port),
               "--prompt", PROMPT, "--max-new-tokens", str(tokens), "--seed", str(seed), "--json"]
    if cloud_only:
        command.append("--cloud-only")
    if device:
        command += ["--device", device]
    env = dict(os.environ, OMP_NUM_THREADS=str(len(cpus) if cpus else 1))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def measure(args: argparse.Namespace) -> dict[float, dict[str, list[dict]]]:
    verifier_cpus, edge_cpus, _ = split_cores()
    results: dict[float, dict[str, list[dict]]] = {}
    async with LocalVerifier(args.config, cpus=verifier_cpus, threads=1,
                             progress=lambda line: print(line, file=sys.stderr)) as verifier:
        for rtt in args.rtt_ms:
            with ThreadedProxy("127.0.0.1", verifier.port, rtt_ms=rtt) as proxy:
                cells: dict[str, list[dict]] = {"cloud-only": [], "default": []}
                for run in range(args.runs):
                    for mode in ("cloud-only", "default"):
                        answer = await asyncio.to_thread(chat, proxy.port, cloud_only=mode == "cloud-only",
                                                         seed=100 + run, tokens=args.max_new_tokens,
                                                         cpus=edge_cpus, device=args.device)
                        cells[mode].append(answer["stats"])
                        stats = answer["stats"]
                        print(f"rtt {rtt:g} ms · {mode:<10} #{run + 1}: {stats['tokens_per_second']:.1f} tok/s, "
                              f"{stats['cloud_tokens']} streamed", file=sys.stderr, flush=True)
                results[rtt] = cells
                write(results, args)  # each round trip's figures as soon as they are complete
    return results


def report(results: dict[float, dict[str, list[dict]]], args: argparse.Namespace, load: tuple[str, str],
           wall_s: float) -> str:
    lines = ["# Fresh `specd chat` processes: cloud-only and the default, answer by answer", "",
             "```sh", "python benchmarks/chat_fresh.py " + shlex.join(sys.argv[1:]), "```", "",
             f"- Load before: {load[0]}", f"- Load after: {load[1]}", f"- Wall time: {wall_s:.0f} s",
             f"- Prompt: {PROMPT!r}, {args.max_new_tokens} new tokens, the config's sampling, seed 100 + run "
             "(the same for both modes)", "",
             "| added RTT | cloud-only median | default: slowest / median / fastest | slowest ÷ cloud-only median "
             "| default answers that streamed (tokens) |", "|---|---|---|---|---|"]
    for rtt, cells in results.items():
        cloud = statistics.median(s["tokens_per_second"] for s in cells["cloud-only"])
        default = sorted(s["tokens_per_second"] for s in cells["default"])
        streamed = [s["cloud_tokens"] for s in cells["default"]]
        lines.append(f"| {rtt:g} ms | {cloud:.1f} tok/s | {default[0]:.1f} / {statistics.median(default):.1f} / "
                     f"{default[-1]:.1f} tok/s | **{default[0] / cloud:.2f}×** | "
                     f"{sum(1 for n in streamed if n)} of {len(streamed)} ({', '.join(map(str, streamed))}) |")
    lines += ["", "## Every answer", "", "| added RTT | run | cloud-only tok/s | default tok/s | streamed | "
              "decision trace (to @ token: speculative vs streaming tok/s) |", "|---|---|---|---|---|---|"]
    for rtt, cells in results.items():
        for run, (cloud, default) in enumerate(zip(cells["cloud-only"], cells["default"], strict=True)):
            trace = "; ".join(f"{s['to']} @ {s['at_token']}: {s['speculative_tok_s']} vs {s['streaming_tok_s']}"
                              for s in default.get("mode_switches", []))
            lines.append(f"| {rtt:g} ms | {run + 1} | {cloud['tokens_per_second']:.1f} | "
                         f"{default['tokens_per_second']:.1f} | {default['cloud_tokens']} | {trace} |")
    return "\n".join(lines) + "\n"


def write(results: dict[float, dict[str, list[dict]]], args: argparse.Namespace) -> None:
    load = (args.load_before, os.popen("uptime").read().strip())
    text = report(results, args, load, time.perf_counter() - args.started)
    args.out.write_text(text, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--config", default=None, help="the verifier's config (default: as specd finds it)")
    parser.add_argument("--device", default=None, help="the chat's --device (default: the config's)")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown report")
    args = parser.parse_args()
    args.load_before, args.started = os.popen("uptime").read().strip(), time.perf_counter()
    asyncio.run(measure(args))
    print(f"Wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
