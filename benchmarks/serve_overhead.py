"""What the local API costs: the same prompts answered through `specd serve`'s HTTP API and through the edge
client directly, interleaved in one run, on the same client and the same verifier.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_overhead.py --rounds 6 --max-tokens 64 \\
        --report benchmarks/serve-overhead.md

The verifier (``specd-verifier``, the embedded SmolLM2-135M target) runs in its own process; this process
runs the edge client (the configured draft, the speculative mode with mode switching, as ``specd chat``)
and the API in front of it (Starlette on uvicorn, as ``specd serve`` starts it). Each answer is greedy
with a fixed seed, so both paths commit the same tokens (checked). The order alternates per pair (direct
then API, API then direct) so drift in the machine's load falls on both. Per answer:

- **total**: direct, from the call to the answer's return; API, from writing the request on a kept-alive
  connection (as the ``openai`` package does) to reading ``data: [DONE]`` (the HTTP request, parsing,
  one server-sent event per piece, the HTTP client's reading);
- **first token**: direct, the first piece with text reaching the callback; API, the first content delta
  read by the HTTP client.

The API's added cost is the median of the per-pair differences, in all (Σ API ÷ Σ direct − 1), and
balanced for order (the second answer of a pair reuses the verifier's cache of the same prompt: see
:func:`balanced`). On a
loaded machine one answer's time varies by far more than the API adds, so each API answer is also timed
from inside (one process, one clock): the time from writing the request to the edge client starting
the answer (less the chat template, which both paths apply), plus the time from the answer's end to
``[DONE]`` read by the HTTP client (``inside_added_ms``); and for the first token the same start plus the
time from the piece reaching the API to its delta read by the client (``inside_added_first_ms``). Those
are what the API adds around an answer; what they leave out is the API's work while the answer runs (one
event per piece on the same event loop), which the paired end-to-end difference includes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from specd.desktop.bench.prompts import PROMPTS
from specd.desktop.client.edge_client import EdgeClient
from specd.desktop.serve import wire
from specd.desktop.serve.answering import AnswerStream
from specd.desktop.serve.service import start_local_api
from specd.shared.config import load_config

MARKS: dict[str, float] = {}  # the last answer's instants inside the API (one answer at a time)


def instrument() -> None:
    """Note when the edge client starts and ends an answer, when the first text reaches the API, and how
    long the chat template took (both paths apply it: not the API's cost)."""
    generate, on_piece, template = EdgeClient.generate, AnswerStream._on_piece, wire._template

    def timed_template(*args):
        started = time.perf_counter()
        try:
            return template(*args)
        finally:
            MARKS["template"] = time.perf_counter() - started

    async def timed_generate(self, *args, **kwargs):
        MARKS["start"] = time.perf_counter()
        MARKS.pop("first", None)
        try:
            return await generate(self, *args, **kwargs)
        finally:
            MARKS["end"] = time.perf_counter()

    def timed_piece(self, piece):
        if piece.text and "first" not in MARKS:
            MARKS["first"] = time.perf_counter()
        return on_piece(self, piece)

    EdgeClient.generate, AnswerStream._on_piece, wire._template = timed_generate, timed_piece, timed_template


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def start_verifier(folder: Path) -> tuple[subprocess.Popen, int]:
    port_file = folder / "port"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPECD_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "specd.daemon.cli", "--port", "0", "--port-file", str(port_file),
                             "--threads", "1", "--log-level", "warning"], env=env)
    for _ in range(1200):
        if port_file.is_file() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            raise SystemExit(f"specd-verifier exited with {proc.returncode}")
        await asyncio.sleep(0.1)
    proc.terminate()
    raise SystemExit("specd-verifier did not start in 120 s")


class Connection:
    """One kept-alive HTTP/1.1 connection, as the ``openai`` package keeps one per host: streamed answers
    read from the socket as they arrive (chunked framing undone here, events split as they complete)."""

    def __init__(self, base: str) -> None:
        self.host, port = base.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def answer(self, text: str, max_tokens: int) -> tuple[float, float, str, float, float]:
        """(total ms, first token ms, text, inside added ms, inside added first-token ms)."""
        if self.reader is None or self.reader.at_eof():  # the server may close an idle connection
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.writer is not None
        body = json.dumps({"model": "specd", "messages": [{"role": "user", "content": text}], "temperature": 0,
                           "seed": 0, "max_tokens": max_tokens, "stream": True}).encode()
        start = time.perf_counter()
        self.writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        raw, events, first_at, parts, done = b"", b"", 0.0, [], 0.0
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.strip(), 16)
            raw = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            events += raw[:-2]
            while b"\n\n" in events:
                event, _, events = events.partition(b"\n\n")
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    done = time.perf_counter()
                    continue
                content = json.loads(data)["choices"][0]["delta"].get("content")
                if content:
                    parts.append(content)
                    first_at = first_at or time.perf_counter()
        setup = MARKS["start"] - start - MARKS.get("template", 0.0)
        return ((done - start) * 1000, (first_at - start) * 1000, "".join(parts),
                (setup + done - MARKS["end"]) * 1000, (setup + first_at - MARKS["first"]) * 1000)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def direct(api, text: str, settings) -> tuple[float, float, str]:
    first: list[float] = []
    async with api.pool.lease() as client:
        start = time.perf_counter()

        def piece(p) -> None:
            if p.text and not first:
                first.append((time.perf_counter() - start) * 1000)

        answer = await client.chat([{"role": "user", "content": text}], settings, piece)
        return (time.perf_counter() - start) * 1000, first[0] if first else 0.0, answer.text


async def run(args: argparse.Namespace) -> dict:
    before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        verifier, port = await start_verifier(Path(tmp))
        try:
            config = load_config(None, overrides={"client": {"server_url": f"ws://127.0.0.1:{port}"},
                                                  "api": {"port": 0, "api_key_env": "", "max_concurrent": 1}})
            api = await start_local_api(config, progress=lambda message: print(message, file=sys.stderr))
            # exactly what the API makes of the request's fields (temperature 0, seed 0, max_tokens)
            settings = wire.Sampled(temperature=0.0, seed=0, max_tokens=args.max_tokens).settings(api.state.defaults)
            prompts = [p.text for p in PROMPTS[:args.prompts]]
            http = Connection(api.url)
            for text in prompts[:2]:  # warm-up: caches, the mode chooser's first estimates
                await direct(api, text, settings)
                await http.answer(text, args.max_tokens)
            pairs, mismatched = [], 0
            for round_ in range(args.rounds):
                for i, text in enumerate(prompts):
                    api_first = (round_ + i) % 2 == 1
                    a = await http.answer(text, args.max_tokens) if api_first else None
                    d = await direct(api, text, settings)
                    a = a or await http.answer(text, args.max_tokens)
                    mismatched += a[2] != d[2]
                    pairs.append({"prompt": i, "api_first": api_first, "direct_ms": d[0], "api_ms": a[0],
                                  "direct_first_ms": d[1], "api_first_ms": a[1], "chars": len(d[2]),
                                  "inside_added_ms": a[3], "inside_added_first_ms": a[4]})
            mode = api.first.client.drafter.device if api.first.client.drafter else "cloud-only"
            mode += f" ({api.first.client.drafter.backend}, {api.first.client.drafter.precision})" \
                if api.first.client.drafter else ""
            http.close()
            await api.stop()
        finally:
            verifier.terminate()
            verifier.wait(30)
    total_d = sum(p["direct_ms"] for p in pairs)
    total_a = sum(p["api_ms"] for p in pairs)
    added = [p["api_ms"] - p["direct_ms"] for p in pairs]
    added_first = [p["api_first_ms"] - p["direct_first_ms"] for p in pairs]
    return {
        "answers_per_path": len(pairs), "max_tokens": args.max_tokens, "draft_device": mode,
        "text_mismatches": mismatched,
        "direct_ms_median": statistics.median(p["direct_ms"] for p in pairs),
        "api_ms_median": statistics.median(p["api_ms"] for p in pairs),
        "added_ms_median": statistics.median(added),
        "added_fraction_median": statistics.median(x / p["direct_ms"] for x, p in zip(added, pairs, strict=True)),
        "added_fraction_in_all": total_a / total_d - 1,
        "direct_first_ms_median": statistics.median(p["direct_first_ms"] for p in pairs),
        "api_first_ms_median": statistics.median(p["api_first_ms"] for p in pairs),
        "added_first_ms_median": statistics.median(added_first),
        "added_fraction_quartiles": quartiles([x / p["direct_ms"] for x, p in zip(added, pairs, strict=True)]),
        "order_balanced_added_fraction": balanced(pairs, lambda p: (p["api_ms"] - p["direct_ms"]) / p["direct_ms"]),
        "order_balanced_added_first_ms": balanced(pairs, lambda p: p["api_first_ms"] - p["direct_first_ms"]),
        "inside_added_ms_median": statistics.median(p["inside_added_ms"] for p in pairs),
        "inside_added_ms_max": max(p["inside_added_ms"] for p in pairs),
        "inside_added_fraction_median": statistics.median(p["inside_added_ms"] / p["direct_ms"] for p in pairs),
        "inside_added_first_ms_median": statistics.median(p["inside_added_first_ms"] for p in pairs),
        "inside_added_first_ms_max": max(p["inside_added_first_ms"] for p in pairs),
        "load_before": before, "load_after": load_average(), "pairs": pairs,
    }


def balanced(pairs: list[dict], added: Callable[[dict], float]) -> float:
    """The mean of the median added cost when the API answered first and when it answered second: the
    second answer of a pair finds the verifier's cache warm with the same prompt, which favours it by
    more than the API costs, and the order alternates, so each order's median carries the bias once."""
    return statistics.mean(statistics.median(added(p) for p in pairs if p["api_first"] is first)
                           for first in (True, False))


def quartiles(values: list[float]) -> str:
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return f"{q1:+.3f} / {q2:+.3f} / {q3:+.3f}"


def report(result: dict, command: str) -> str:
    rows = [k for k in result if k not in ("pairs", "load_before", "load_after")]
    lines = ["# The local API's cost (specd serve against the edge client directly)", "",
             f"Command: `{command}`", "",
             f"Load average (1, 5, 15 min) before {result['load_before']}, after {result['load_after']} "
             "(2 cores, shared with other work).", "", "| figure | value |", "|---|---|"]
    for key in rows:
        value = result[key]
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="times each prompt is answered by each path")
    parser.add_argument("--prompts", type=int, default=5, help="how many of the bench prompts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--report", type=Path, help="write a Markdown report here (and the figures as .json)")
    args = parser.parse_args()
    instrument()
    result = asyncio.run(run(args))
    summary = {k: v for k, v in result.items() if k != "pairs"}
    print(json.dumps(summary, indent=2))
    if args.report:
        command = "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(["benchmarks/serve_overhead.py", *sys.argv[1:]])
        args.report.write_text(report(result, command), encoding="utf-8")
        args.report.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
