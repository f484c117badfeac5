"""Per prompt set, round trip and mode of a ``specd bench`` run: how the context proposer drafted.

    python benchmarks/context_summary.py benchmarks/context-proposer/bench.json

Prints, summed over the cell's answers: drafts verified, looked-up drafts sent (and accepted), looked-up
tokens fed to the drafter's forwards as its guess (``lookahead_fed``) and the model's drafts read from them
(``looked_ahead_drafts``), the drafter's milliseconds per answer and per draft (the prompt read included),
time to first token and the answer's whole time.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path


def summary(path: str) -> str:
    runs = json.loads(Path(path).read_text(encoding="utf-8"))["runs"]
    cells: dict[tuple, Counter] = defaultdict(Counter)
    for run in runs:
        stats = run["stats"]
        cell = cells[(run.get("prompt_set", "standard"), run["rtt_ms"], run["mode"])]
        cell["answers"] += 1
        for key in ("generated", "drafted", "lookahead_fed", "looked_ahead_drafts", "edge_ms", "ttft_ms", "total_ms"):
            cell[key] += stats.get(key, 0)
        cell["looked up"] += stats["proposed_by_source"]["context"]
        cell["looked up, accepted"] += stats["accepted_by_source"]["context"]
    lines = ["| set | RTT | mode | tokens | drafts | looked up (accepted) | guess fed | drafts read from it | "
             "draft ms/answer | draft ms/draft | TTFT ms | ms/answer |", "|" + "---|" * 12]
    for (prompt_set, rtt, mode), c in sorted(cells.items()):
        n = c["answers"]
        lines.append(f"| {prompt_set} | {rtt:.0f} ms | {mode} | {c['generated']} | {c['drafted']} | "
                     f"{c['looked up']} ({c['looked up, accepted']}) | {c['lookahead_fed']} | "
                     f"{c['looked_ahead_drafts']} | {c['edge_ms'] / n:.0f} | "
                     f"{c['edge_ms'] / max(1, c['drafted']):.1f} | {c['ttft_ms'] / n:.0f} | {c['total_ms'] / n:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1]))
