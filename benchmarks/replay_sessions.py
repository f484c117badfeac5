"""Replayed speculative sessions against a verifier URL, measured in one common window, with CPU accounting.

Each session connects, asks the verifier for the greedy answer to its prompt (cloud-only, the warm-up),
then waits until every session has finished its warm-up. From then on all sessions measure the same
wall-clock window of ``duration_s``: speculative requests back to back whose drafts are that answer, γ
at a time — every draft is accepted, the edge costs nothing, and each verdict is checked against the
replayed answer. Only verdicts that arrive inside the window count; a session stops at the window's end
(mid-request). Per round it keeps the latency (send to verdict) and the verifier's own share of it
(``queue_ms + forward_ms`` of the verdict), so the rest — transport, proxies, session driver — is known.

During the window it reads, from ``/proc``, the CPU time of this process (the clients) and of every
process below it (the daemon or the local Ray cluster: replicas, Serve's proxy, HAProxy, the controller,
Ray's own daemons), and the machine's total, so the report can say where the two cores went.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from websockets.asyncio.client import connect

from specd.shared import messages as m
from specd.shared.protocol import ClientSession, RequestStarted, RoundDiscarded, RoundVerdict, TokensStreamed

KEY = "benchmark-key"
GAMMA = 4
ANSWER_TOKENS = 64
GREEDY = m.Sampling(temperature=0.0, top_p=1.0)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    tokens: int = 0
    rounds: int = 0
    discarded: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    outside_ms: list[float] = field(default_factory=list)  # latency − the verifier's queue_ms + forward_ms
    forward_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    replicas: dict[str, int] = field(default_factory=dict)  # server name (one per replica) → sessions
    cpu_s_per_s: dict[str, float] = field(default_factory=dict)  # process kind → CPU seconds per second
    load_average: float = 0.0  # 1-minute load average at the window's start

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s else 0.0

    @staticmethod
    def p50(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")


@dataclass
class Window:
    """The common measurement window: set by the first session past the barrier."""

    barrier: asyncio.Barrier
    start: float = 0.0
    end: float = 0.0


async def reference_answer(ws, session: ClientSession, prompt: list[int]) -> list[int]:
    """The verifier's own greedy continuation (cloud-only), the drafts every later round replays."""
    await ws.send(session.start(prompt, max_new_tokens=ANSWER_TOKENS, sampling=GREEDY, seed=0, stop=[],
                                mode="cloud"))
    tokens: list[int] = []
    while not session.finished:
        for event in session.receive(await ws.recv()):
            if isinstance(event, TokensStreamed):
                tokens += event.tokens.tokens
    return tokens


async def replay(url: str, fingerprint: str, prompt: list[int], window: Window, duration_s: float,
                 out: Measured) -> None:
    async with connect(url, compression=None, max_size=None, additional_headers={"Authorization": f"Bearer {KEY}"},
                       open_timeout=60) as ws:
        session = ClientSession(tokenizer=fingerprint, client="specd-bench-ray")
        await ws.send(session.hello())
        session.receive(await ws.recv())
        assert session.welcome is not None
        server = session.welcome.server
        out.replicas[server] = out.replicas.get(server, 0) + 1
        answer = await reference_answer(ws, session, prompt)
        await window.barrier.wait()  # the warm-ups are over everywhere: the window starts
        if not window.start:
            window.start = time.perf_counter()
            window.end = window.start + duration_s
        while True:
            await ws.send(session.start(prompt, max_new_tokens=len(answer), sampling=GREEDY, seed=0, stop=[],
                                        mode="speculative"))
            done = 0
            sent: float | None = None  # one round in flight at a time
            while not session.finished:
                if sent is None:
                    if time.perf_counter() >= window.end:
                        return
                    _round, frame = session.draft(answer[done:done + GAMMA])
                    sent = time.perf_counter()
                    await ws.send(frame)
                for event in session.receive(await ws.recv()):
                    if isinstance(event, RoundVerdict):
                        now = time.perf_counter()
                        assert event.new_tokens == answer[done:done + len(event.new_tokens)], "a verdict differs"
                        done += len(event.new_tokens)
                        if now <= window.end:
                            latency = (now - (sent or now)) * 1000.0
                            verdict = event.verdict
                            out.latencies_ms.append(latency)
                            out.forward_ms.append(verdict.forward_ms)
                            out.outside_ms.append(latency - verdict.queue_ms - verdict.forward_ms)
                            out.tokens += len(event.new_tokens)
                            out.rounds += 1
                        sent = None
                    elif isinstance(event, RoundDiscarded):
                        out.discarded += 1  # counted and reported: drafted again at the committed position
                        sent = None
                    elif not isinstance(event, RequestStarted):
                        raise AssertionError(f"unexpected {event!r}")


def process_kind(pid: int) -> str:
    """What a process below the benchmark is, from its command line (Ray names its workers ``ray::Class``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return "gone"
    for marker, kind in (("ServeReplica", "replicas"), ("ProxyActor", "serve_proxy"), ("haproxy", "haproxy"),
                         ("HAProxyManager", "serve_proxy"), ("ServeController", "serve_controller"),
                         ("specd.daemon", "daemon")):
        if marker in cmdline:
            return kind
    return "ray_other"  # gcs_server, raylet, the dashboard and runtime-env agents, idle workers


def cpu_by_kind() -> Counter[str]:
    """CPU seconds so far of this process ("clients") and of each kind of process below it."""
    me = os.getpid()
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    totals: Counter[str] = Counter()
    for pid, seconds in times.items():
        ancestor = pid
        while ancestor not in (me, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == me:
            totals["clients" if pid == me else process_kind(pid)] += seconds
    return totals


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every user's processes), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS


async def measure(url: str, fingerprint: str, prompts: list[list[int]], duration_s: float) -> Measured:
    out = Measured(elapsed_s=duration_s)
    window = Window(asyncio.Barrier(len(prompts)))
    sessions = asyncio.gather(*(replay(url, fingerprint, p, window, duration_s, out) for p in prompts))
    while not window.start:  # the warm-ups
        await asyncio.sleep(0.01)
        if sessions.done():
            break
    before, busy_before, started = cpu_by_kind(), machine_busy_s(), time.perf_counter()
    out.load_average = os.getloadavg()[0]
    await sessions
    after, busy_after, wall = cpu_by_kind(), machine_busy_s(), time.perf_counter() - started
    kinds = {kind: (after[kind] - before.get(kind, 0.0)) / wall for kind in after if kind != "gone"}
    kinds["machine"] = (busy_after - busy_before) / wall
    kinds["other_users"] = kinds["machine"] - sum(v for k, v in kinds.items() if k != "machine")
    out.cpu_s_per_s = {kind: round(value, 3) for kind, value in sorted(kinds.items())}
    return out


def merged(parts: list[Measured]) -> Measured:
    """Several windows on one target as one: counts and samples added, CPU and load averaged."""
    out = Measured(load_average=statistics.fmean(part.load_average for part in parts))
    for part in parts:
        out.tokens += part.tokens
        out.rounds += part.rounds
        out.discarded += part.discarded
        out.elapsed_s += part.elapsed_s
        out.latencies_ms += part.latencies_ms
        out.outside_ms += part.outside_ms
        out.forward_ms += part.forward_ms
        for server, count in part.replicas.items():
            out.replicas[server] = out.replicas.get(server, 0) + count
    kinds = {kind for part in parts for kind in part.cpu_s_per_s}
    out.cpu_s_per_s = {kind: round(statistics.fmean(part.cpu_s_per_s.get(kind, 0.0) for part in parts), 3)
                       for kind in sorted(kinds)}
    return out
