"""The chooser benchmark's table: spec-pipelined against cloud-only per round trip, for each run given.

    python benchmarks/chooser_summary.py benchmarks/smollm2-2core-chooser/{default-1,rounds-only}/bench.json

Each run's speedups are its own (cloud-only measured in the same run, modes in turns); the last column
divides the first run's speedup by the second's (e.g. the default against rounds only), a ratio of ratios
from two runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cells(path: Path) -> dict[str, dict]:
    report = json.loads(path.read_text(encoding="utf-8"))
    device = next(iter(report["by_rtt"]))
    return report["by_rtt"][device]


def main(paths: list[str]) -> int:
    runs = {Path(p).parent.name: cells(Path(p)) for p in paths}
    names = list(runs)
    rtts = list(next(iter(runs.values())))
    head = "| added RTT | " + " | ".join(f"{n}: cloud-only tok/s, spec-pipelined ×, streamed" for n in names)
    if len(names) == 2:
        head += f" | {names[0]} ÷ {names[1]}"
    print(head + " |")
    print("|---" * (len(names) + 1 + (len(names) == 2)) + "|")
    for rtt in rtts:
        row = [f"{rtt} ms"]
        speedups = []
        for name in names:
            by_mode = runs[name].get(rtt, {})
            cloud, spec = by_mode.get("cloud-only"), by_mode.get("spec-pipelined")
            if not cloud or not spec:
                row.append("–")
                speedups.append(None)
                continue
            speedups.append(spec["speedup"])
            row.append(f"{cloud['tokens_per_second']:.1f}, **{spec['speedup']:.2f}×**, "
                       f"{spec.get('streamed_tokens', 0)} of {spec['generated_tokens']}")
        if len(names) == 2:
            row.append(f"{speedups[0] / speedups[1]:.2f}" if all(speedups) else "–")
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
