"""Load and reliability run: N concurrent sessions against a verifier subprocess on a tiny model.

    python -m tests.load --sessions 64 --duration 60                   # the load run alone
    python -m tests.load --sessions 64 --duration 60 --faults --report benchmarks/reliability.md
    make reliability                                                     # the same, in one command

Each session speaks the protocol with ``ClientSession`` (no draft model: the load is the verifier's):
greedy rounds, sampled rounds with valid sparse proposals, and cloud-only streams, in a fixed mix; every
few requests it reconnects, so sessions come and go. Any error message, unexpected close or exception
counts as an error. The verifier's RSS is sampled throughout; round latency is measured at the client
(send to verdict). ``--faults`` also runs the fault, abuse and fuzz tests and reports their outcome.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from websockets.asyncio.client import connect

from specd.shared import messages as m
from specd.shared.protocol import (
    ClientSession,
    RequestStarted,
    RoundDiscarded,
    RoundVerdict,
    ServerFailed,
    TokensStreamed,
)
from specd.shared.sampling import ProposalDistribution, encode_proposal

VOCAB = 64
FAULT_TESTS = ["tests/test_faults.py", "tests/test_daemon_abuse.py", "tests/test_daemon_tls.py",
               "tests/test_fuzz_messages.py", "tests/test_fuzz_session.py", "tests/test_fuzz_sampling.py",
               "tests/test_fuzz_daemon.py"]


@dataclass
class LoadResult:
    sessions: int
    duration_s: float
    requests: int = 0
    rounds: int = 0
    tokens: int = 0
    connections: int = 0
    errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)  # the verifier's RSS, sampled every 0.25 s
    elapsed_s: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def rss_bounded(self) -> bool:
        """No growth over the run: the last third's peak within 10 % (+16 MiB) of the first third's."""
        if len(self.rss_kib) < 6:
            return True
        third = len(self.rss_kib) // 3
        return max(self.rss_kib[-third:]) <= 1.10 * max(self.rss_kib[:third]) + 16 * 1024


def _proposal(rng: random.Random, tokens: list[int], k: int = 4) -> ProposalDistribution:
    """A valid sparse proposal: each draft inside its own row, rows summing to 1."""
    ids: list[list[int]] = []
    probs: list[list[float]] = []
    for t in tokens:
        weights = [rng.uniform(0.05, 1.0) for _ in range(k)]
        ids.append([t, *rng.sample([i for i in range(3, VOCAB) if i != t], k - 1)])
        probs.append([w / sum(weights) for w in weights])
    return ProposalDistribution(ids=torch.tensor(ids), probs=torch.tensor(probs, dtype=torch.float32))


async def _one_session(url: str, fingerprint: str, index: int, deadline: float, result: LoadResult) -> None:
    """Requests back to back until ``deadline``; reconnects every few requests."""
    rng = random.Random(index)
    kind = ("greedy", "sampled", "greedy", "cloud")[index % 4]
    while time.monotonic() < deadline:
        async with connect(url, compression=None, max_size=None) as ws:
            result.connections += 1
            session = ClientSession(tokenizer=fingerprint, client="specd-load")
            await ws.send(session.hello())
            session.receive(await ws.recv())
            for _ in range(rng.randint(2, 6)):
                if time.monotonic() >= deadline:
                    break
                await _one_request(ws, session, kind, rng, result)


async def _one_request(ws, session: ClientSession, kind: str, rng: random.Random, result: LoadResult) -> None:
    prompt = [1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(8, 48))]
    sampling = m.Sampling(temperature=0.0 if kind == "greedy" else 0.9, top_p=0.95 if kind != "greedy" else 1.0)
    await ws.send(session.start(prompt, max_new_tokens=rng.randint(16, 48), sampling=sampling,
                                seed=rng.randrange(2**31), stop=[2], mode="cloud" if kind == "cloud" else
                                "speculative"))
    result.requests += 1
    sent_at: float | None = None
    while not session.finished:
        if kind != "cloud" and sent_at is None:
            gamma = rng.randint(1, 6)
            drafts = [rng.randrange(3, VOCAB) for _ in range(gamma)]
            proposal = encode_proposal(_proposal(rng, drafts)) if kind == "sampled" else None
            _rnd, frame = session.draft(drafts, proposal)
            sent_at = time.perf_counter()
            await ws.send(frame)
        for event in session.receive(await asyncio.wait_for(ws.recv(), 60)):
            if isinstance(event, RoundVerdict):
                result.latencies_ms.append((time.perf_counter() - (sent_at or 0.0)) * 1000.0)
                result.rounds += 1
                result.tokens += len(event.new_tokens)
                sent_at = None
            elif isinstance(event, TokensStreamed):
                result.tokens += len(event.tokens.tokens)
            elif isinstance(event, ServerFailed):
                raise AssertionError(f"server error: {event.error}")
            elif isinstance(event, RoundDiscarded):
                raise AssertionError("a round at the committed position was discarded")
            elif not isinstance(event, RequestStarted):
                raise AssertionError(f"unexpected event {event!r}")


async def _guarded(coro, result: LoadResult, index: int) -> None:
    try:
        await coro
    except Exception as exc:  # every failure is an error of the run, with its session
        result.errors.append(f"session {index}: {type(exc).__name__}: {exc}")


async def run_load(sessions: int, duration_s: float, *, threads: int = 1, workdir: Path | None = None) -> LoadResult:
    """Start a verifier subprocess on a tiny model, run ``sessions`` clients for ``duration_s``."""
    from specd.shared.fingerprint import tokenizer_fingerprint
    from tests.daemon_process import DaemonProcess
    from tests.tiny_models import save_tiny_model, tiny_tokenizer

    with tempfile.TemporaryDirectory(prefix="specd-load-") as tmp:
        root = Path(workdir or tmp)
        folder = save_tiny_model(root / "target", seed=1)
        daemon = DaemonProcess(folder, root, args=("--max-sessions", str(sessions), "--threads", str(threads)))
        daemon.start()
        result = LoadResult(sessions=sessions, duration_s=duration_s)
        stop = asyncio.Event()

        async def sample_rss() -> None:
            while not stop.is_set():
                rss = daemon.rss_kib()
                if rss is not None:
                    result.rss_kib.append(rss)
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample_rss())
        began = time.monotonic()
        deadline = began + duration_s
        fingerprint = tokenizer_fingerprint(tiny_tokenizer())
        try:
            await asyncio.gather(*(_guarded(_one_session(daemon.url, fingerprint, i, deadline, result), result, i)
                                   for i in range(sessions)))
        finally:
            result.elapsed_s = time.monotonic() - began
            stop.set()
            await sampler
            daemon.stop()
        return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs visible, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def summary(result: LoadResult) -> list[str]:
    rss = result.rss_kib
    mib = (lambda kib: f"{kib / 1024:.0f} MiB")
    return [
        f"| sessions | {result.sessions} concurrent ({result.connections} connections opened) |",
        f"| duration | {result.elapsed_s:.1f} s |",
        f"| requests | {result.requests} |",
        f"| rounds verified | {result.rounds} ({result.rounds / max(result.elapsed_s, 1e-9):.0f}/s) |",
        f"| tokens committed | {result.tokens} ({result.tokens / max(result.elapsed_s, 1e-9):.0f}/s) |",
        f"| errors | {len(result.errors)} |",
        f"| round latency p50 / p99 | {result.percentile(0.50):.1f} ms / {result.percentile(0.99):.1f} ms |",
        (f"| verifier RSS start / peak / end | {mib(rss[0])} / {mib(max(rss))} / {mib(rss[-1])} "
         f"({'bounded' if result.rss_bounded else 'GROWING'}) |") if rss else "| verifier RSS | not sampled |",
    ]


def run_fault_tests(fuzz_examples: int) -> tuple[str, float, int]:
    """The fault, abuse and fuzz tests: their pytest summary line, wall time and exit status."""
    env = dict(os.environ, SPECD_FUZZ_EXAMPLES=str(fuzz_examples), OMP_NUM_THREADS="1")
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FAULT_TESTS],
                          env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    failed = [line.removeprefix("FAILED ") for line in lines if line.startswith("FAILED ")]
    outcome = (lines[-1] if lines else proc.stderr.strip()[-200:]) + "".join(f"; failed: {f}" for f in failed)
    return outcome, time.monotonic() - began, proc.returncode


def report(result: LoadResult, command: str, faults: tuple[str, float, int] | None) -> str:
    lines = ["# Reliability: load and faults", "",
             "Produced by `make reliability` (`python -m tests.load`); rerun it to refresh this file.", "",
             f"- Command: `{command}`",
             f"- Machine: {machine()}",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "## Load", "",
             "A verifier subprocess (`python -m specd.daemon`, tiny Llama: 2 layers, vocabulary 64, CPU, one "
             "torch thread) and concurrent protocol sessions: a quarter each greedy, sampled (sparse "
             "proposals, K = 4), greedy, cloud-only; random drafts of γ 1–6, 16–48 new tokens per request, "
             "a reconnection every 2–6 requests. Latency is per round, send to verdict, at the client.", "",
             "| | |", "|---|---|", *summary(result)]
    if result.errors:
        lines += ["", "Errors (first 20):", "", *[f"- {e}" for e in result.errors[:20]]]
    if faults is not None:
        line, seconds, status = faults
        lines += ["", "## Faults, abuse and fuzzing", "",
                  f"`pytest {' '.join(FAULT_TESTS)}` with `SPECD_FUZZ_EXAMPLES` as in the command: "
                  f"**{line}** ({seconds:.0f} s, exit status {status}).", "",
                  "- kill -9 of the verifier mid-answer, then a restart on the same port: cloud-only, "
                  "speculative and seeded-sampling answers equal the uninterrupted ones token for token;",
                  "- a proxy that stalls and cuts connections (and refuses reconnections for a while); SIGTERM "
                  "with four sessions in flight: every client resumes and finishes identically;",
                  "- 48 kinds of bad input against a running verifier, a flooding client, a client that stops "
                  "reading, idle and malformed HTTP connections, wss with certificate checks;",
                  "- property-based fuzzing of the decoder, both sessions, the sampling core, and a running "
                  "verifier (whose KV cache must still give full-forward verdicts afterwards)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=64, help="concurrent sessions (default 64)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--threads", type=int, default=1, help="the verifier's torch threads (default 1)")
    parser.add_argument("--faults", action="store_true", help="also run the fault, abuse and fuzz tests")
    parser.add_argument("--fuzz-examples", type=int, default=2000,
                        help="SPECD_FUZZ_EXAMPLES for the fuzz tests with --faults (default 2000)")
    parser.add_argument("--report", metavar="PATH", help="write the Markdown report here")
    args = parser.parse_args(argv)
    command = "python -m tests.load " + " ".join(argv if argv is not None else sys.argv[1:])
    faults = run_fault_tests(args.fuzz_examples) if args.faults else None
    result = asyncio.run(run_load(args.sessions, args.duration, threads=args.threads))
    text = report(result, command, faults)
    print(text)
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text, encoding="utf-8")
    ok = not result.errors and result.rss_bounded and (faults is None or faults[2] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
