"""Scale-out benchmark: the verifier as a Ray Serve application, one and two replicas, against the daemon.

    .venv/bin/python benchmarks/ray_scaleout.py --sessions 8 --duration 20 --report benchmarks/ray-scaleout.md

The embedded target (SmolLM2-135M-Instruct, fp32), one CPU core and one torch thread per replica.
Drafts are replayed: each session first asks the verifier for the greedy answer to its prompt
(cloud-only), then runs speculative requests whose drafts are that answer, γ at a time — every draft is
accepted, the edge costs nothing, and each verdict is checked against the replayed answer. Figures:

- aggregate verified tokens/s with ``--sessions`` concurrent sessions: 1 replica, 2 replicas (ratio);
- per-round latency (send to verdict, one session, p50) through Serve's proxy against the standalone
  ``specd-verifier`` in the same run: the proxy's added latency per round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.daemon_process, run from a checkout

from websockets.asyncio.client import connect

from specd.shared import messages as m
from specd.shared.protocol import ClientSession, RequestStarted, RoundDiscarded, RoundVerdict, TokensStreamed

MODEL = "smollm2-135m-instruct"
KEY = "benchmark-key"
GAMMA = 4
ANSWER_TOKENS = 64
GREEDY = m.Sampling(temperature=0.0, top_p=1.0)


@dataclass
class Measured:
    tokens: int = 0
    rounds: int = 0
    discarded: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s else 0.0

    def p50(self) -> float:
        return statistics.median(self.latencies_ms) if self.latencies_ms else float("nan")


def prompt_for(index: int, tokenizer) -> list[int]:
    question = [{"role": "user", "content": f"Write a short story about the number {index}."}]
    text = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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


async def replay(url: str, fingerprint: str, prompt: list[int], duration_s: float, out: Measured) -> None:
    """Speculative requests back to back for ``duration_s`` after the warm-up; every draft is the reference."""
    async with connect(url, compression=None, max_size=None, additional_headers={"Authorization": f"Bearer {KEY}"},
                       open_timeout=60) as ws:
        session = ClientSession(tokenizer=fingerprint, client="specd-bench-ray")
        await ws.send(session.hello())
        session.receive(await ws.recv())
        answer = await reference_answer(ws, session, prompt)
        deadline = time.monotonic() + duration_s  # the warm-up (the reference answer) is not measured
        while time.monotonic() < deadline:
            await ws.send(session.start(prompt, max_new_tokens=len(answer), sampling=GREEDY, seed=0, stop=[],
                                        mode="speculative"))
            done = 0
            sent: float | None = None  # one round in flight at a time
            while not session.finished:
                if sent is None:
                    _round, frame = session.draft(answer[done:done + GAMMA])
                    sent = time.perf_counter()
                    await ws.send(frame)
                for event in session.receive(await ws.recv()):
                    if isinstance(event, RoundVerdict):
                        out.latencies_ms.append((time.perf_counter() - (sent or 0.0)) * 1000.0)
                        assert event.new_tokens == answer[done:done + len(event.new_tokens)], "a verdict differs"
                        done += len(event.new_tokens)
                        out.tokens += len(event.new_tokens)
                        out.rounds += 1
                        sent = None
                    elif isinstance(event, RoundDiscarded):
                        out.discarded += 1  # counted and reported: drafted again at the committed position
                        sent = None
                    elif not isinstance(event, RequestStarted):
                        raise AssertionError(f"unexpected {event!r}")


async def measure(url: str, fingerprint: str, prompts: list[list[int]], duration_s: float) -> Measured:
    out = Measured(elapsed_s=duration_s)  # each session measures duration_s after its own warm-up
    await asyncio.gather(*(replay(url, fingerprint, p, duration_s, out) for p in prompts))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(sessions: int, duration_s: float) -> dict:
    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from specd.daemon.ray_serve import APP_NAME, build_app
    from specd.shared.fingerprint import tokenizer_fingerprint
    from specd.shared.models import ensure_hf_folder
    from tests.daemon_process import DaemonProcess

    folder = ensure_hf_folder(MODEL, progress=lambda msg: print(msg, flush=True))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    fingerprint = tokenizer_fingerprint(tokenizer)
    prompts = [prompt_for(i, tokenizer) for i in range(sessions)]
    results: dict = {"sessions": sessions, "duration_s": duration_s, "gamma": GAMMA, "model": MODEL}
    with tempfile.TemporaryDirectory(prefix="specd-ray-bench-") as tmp:
        daemon = DaemonProcess(folder, Path(tmp), args=("--max-sessions", str(sessions)))
        daemon.start(timeout=300)
        try:
            print("standalone daemon: 1 session (latency)", flush=True)
            results["daemon_1"] = asyncio.run(measure(daemon.url, fingerprint, prompts[:1], duration_s)).__dict__
        finally:
            daemon.stop()
        port = free_port()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"SPECD_API_KEY": KEY, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"ws://127.0.0.1:{port}"
            for replicas in (1, 2):
                serve.run(build_app({"overrides": {"models": {"target": str(folder)}, "server": {"device": "cpu"},
                                                   "limits": {"max_sessions": sessions}}, "threads": 1,
                                     "deployment": {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 1}}}),
                          name=APP_NAME, route_prefix="/")
                if replicas == 1:
                    print("ray, 1 replica: 1 session (latency)", flush=True)
                    results["ray1_1"] = asyncio.run(measure(url, fingerprint, prompts[:1], duration_s)).__dict__
                print(f"ray, {replicas} replica(s): {sessions} sessions", flush=True)
                results[f"ray{replicas}_{sessions}"] = asyncio.run(
                    measure(url, fingerprint, prompts, duration_s)).__dict__
        finally:
            serve.shutdown()
            ray.shutdown()
    return results


def summary(results: dict) -> dict:
    def stat(key: str) -> Measured:
        return Measured(**results[key])

    n = results["sessions"]
    one, two = stat(f"ray1_{n}"), stat(f"ray2_{n}")
    daemon, proxied = stat("daemon_1"), stat("ray1_1")
    return {"tokens_per_s_1_replica": round(one.tokens_per_s, 1), "tokens_per_s_2_replicas": round(two.tokens_per_s, 1),
            "scaling": round(two.tokens_per_s / one.tokens_per_s, 3),
            "round_p50_ms_daemon": round(daemon.p50(), 2), "round_p50_ms_ray": round(proxied.p50(), 2),
            "proxy_added_p50_ms": round(proxied.p50() - daemon.p50(), 2),
            "discarded": {k: results[k]["discarded"] for k in ("daemon_1", "ray1_1", f"ray1_{n}", f"ray2_{n}")},
            "rounds": {k: results[k]["rounds"] for k in ("daemon_1", "ray1_1", f"ray1_{n}", f"ray2_{n}")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measurement")
    parser.add_argument("--report", type=Path, help="write the figures here (.md; a .json beside it)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = run(args.sessions, args.duration)
    figures = summary(results)
    print(json.dumps(figures, indent=2))
    if args.report:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, shared with other engineers' jobs during the run"
        args.report.with_suffix(".json").write_text(json.dumps({"summary": figures, "raw": results, "machine": machine},
                                                               indent=1) + "\n")
        lines = ["# Ray Serve scale-out", "", f"Command: `{' '.join(['.venv/bin/python', *sys.argv])}`", "",
                 f"Machine: {machine}.", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in figures.items() if k not in ("rounds", "discarded")]
        lines += ["", f"Rounds measured: {figures['rounds']}; discarded: {figures['discarded']}", ""]
        args.report.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
