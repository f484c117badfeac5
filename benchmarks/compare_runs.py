"""Two `specd bench` runs side by side, cell by cell: tok/s and speedup against cloud-only per round trip and
mode, and the ratio of the second to the first.

    python benchmarks/compare_runs.py BEFORE/bench.json AFTER/bench.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cells(path: Path) -> dict[tuple[str, str], dict]:
    report = json.loads(path.read_text(encoding="utf-8"))
    device = next(iter(report["by_rtt"]))
    return {(rtt, mode): fig for rtt, modes in report["by_rtt"][device].items() for mode, fig in modes.items()}


def main(before: str, after: str) -> None:
    first, second = cells(Path(before)), cells(Path(after))
    print("| added RTT | mode | tok/s before | tok/s after | after ÷ before | speedup before | speedup after |")
    print("|---|---|---|---|---|---|---|")
    for key in first:
        if key not in second:
            continue
        a, b = first[key], second[key]
        ratio = b["tokens_per_second"] / a["tokens_per_second"] if a["tokens_per_second"] else float("nan")
        print(f"| {key[0]} ms | {key[1]} | {a['tokens_per_second']:.2f} | {b['tokens_per_second']:.2f} | "
              f"{ratio:.2f} | {a['speedup'] or 0:.2f}× | {b['speedup'] or 0:.2f}× |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
