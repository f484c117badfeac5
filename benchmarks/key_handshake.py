"""The hidden cost of named client keys: the handshake with 1,000 keys in the keys file against one key.

Two verifiers in this one process, on the same tiny target model, one whose keys file holds one key and
one whose file holds 1,000 (the client's key last). Handshakes alternate between them — connect with the
bearer key (HTTP upgrade, the key checked), ``hello``, ``welcome``, close — so both sides share the same
load; the medians and their difference are reported, with the key lookup alone (``authenticate``) timed
the same way, and the time a reload of each file takes.

    OMP_NUM_THREADS=1 python -m benchmarks.key_handshake [--handshakes 2000] [--report benchmarks/key-handshake.md]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
from websockets.asyncio.client import connect

from specd.daemon.client_auth import ClientKeys
from specd.daemon.client_keys import KeyRecord, key_digest, new_key, now_rfc3339, render_keys_file, write_private
from specd.daemon.server import Verifier
from specd.shared.config import load_config
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.protocol import ClientSession
from tests.tiny_models import save_tiny_model, tiny_tokenizer


def keys_file(folder: Path, count: int, key: str) -> Path:
    """``count`` keys, the client's ``key`` the last one written."""
    records = {f"client-{i}": KeyRecord(name=f"client-{i}", digest=key_digest(new_key()), created=now_rfc3339())
               for i in range(count - 1)}
    records["bench"] = KeyRecord(name="bench", digest=key_digest(key), created=now_rfc3339())
    path = folder / f"keys-{count}.toml"
    write_private(path, render_keys_file(records))
    return path


def config(model: Path, keys: Path):
    cfg = load_config(None, {"server": {"host": "127.0.0.1", "port": 0, "device": "cpu", "api_key_env": ""},
                             "models": {"target": str(model)}})
    return msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, keys_file=str(keys)))


async def handshake(url: str, key: str, fingerprint: str) -> float:
    started = time.perf_counter()
    async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, compression=None) as ws:
        session = ClientSession(tokenizer=fingerprint, client="bench")
        await ws.send(session.hello())
        session.receive(await ws.recv())
        elapsed = time.perf_counter() - started
    assert session.welcome is not None
    return elapsed * 1000.0


def lookup_us(table: ClientKeys, key: str, rounds: int) -> float:
    header = [f"Bearer {key}"]
    started = time.perf_counter()
    for _ in range(rounds):
        table.authenticate(header)
    return (time.perf_counter() - started) / rounds * 1e6


async def run(handshakes: int) -> dict[str, object]:
    key = new_key()
    fingerprint = tokenizer_fingerprint(tiny_tokenizer())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = save_tiny_model(folder / "target", seed=1)
        files = {count: keys_file(folder, count, key) for count in (1, 1000)}
        reload_ms = {}
        for count, path in files.items():
            started = time.perf_counter()
            table = ClientKeys(path, None, persist_usage=False)
            reload_ms[count] = (time.perf_counter() - started) * 1000.0
            assert len(table.by_digest) == count
        tables = {count: ClientKeys(path, None, persist_usage=False) for count, path in files.items()}
        lookups: dict[int, list[float]] = {1: [], 1000: []}
        for _ in range(20):
            for count, table in tables.items():
                lookups[count].append(lookup_us(table, key, 2000))
        times: dict[int, list[float]] = {1: [], 1000: []}
        async with Verifier(config(model, files[1]), persist_usage=False) as one, \
                Verifier(config(model, files[1000]), persist_usage=False) as many:
            for _ in range(50):  # warm-up, not counted
                await handshake(one.url, key, fingerprint)
                await handshake(many.url, key, fingerprint)
            for i in range(handshakes):
                order = ((1, one), (1000, many)) if i % 2 == 0 else ((1000, many), (1, one))
                for count, verifier in order:
                    times[count].append(await handshake(verifier.url, key, fingerprint))
    med = {count: statistics.median(values) for count, values in times.items()}
    return {"handshakes": handshakes, "median_ms": med, "difference_ms": med[1000] - med[1],
            "p90_ms": {c: statistics.quantiles(v, n=10)[-1] for c, v in times.items()},
            "lookup_us": {c: statistics.median(v) for c, v in lookups.items()}, "reload_ms": reload_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handshakes", type=int, default=2000, help="per side (default 2000)")
    parser.add_argument("--report", type=Path, help="append the result to this Markdown file")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    result = asyncio.run(run(args.handshakes))
    load_after = os.getloadavg()[0]
    med, p90, lookup, reload_ms = result["median_ms"], result["p90_ms"], result["lookup_us"], result["reload_ms"]
    lines = [
        f"- {result['handshakes']} handshakes per side, alternating; load average {load_before:.2f} before, "
        f"{load_after:.2f} after",
        f"- handshake median: 1 key {med[1]:.3f} ms, 1,000 keys {med[1000]:.3f} ms: difference "
        f"**{result['difference_ms']:+.3f} ms** (p90 {p90[1]:.3f} / {p90[1000]:.3f} ms)",
        f"- key lookup alone (hash + dict): 1 key {lookup[1]:.2f} µs, 1,000 keys {lookup[1000]:.2f} µs",
        f"- reading the keys file (start, reload): 1 key {reload_ms[1]:.2f} ms, 1,000 keys {reload_ms[1000]:.2f} ms",
    ]
    print("\n".join(lines))
    if args.report:
        with open(args.report, "a", encoding="utf-8") as fh:
            command = " ".join(["python -m benchmarks.key_handshake", *sys.argv[1:]])
            fh.write(f"\n### Run at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC\n\n"
                     f"`{command}`\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
