"""The outputs of ``specd-verifier capacity``: a terminal table, ``capacity.json``, ``capacity.md``, ``capacity.png``.

JSON layout: ``meta`` (target, device, dtype, recording, command), ``cells`` (one object per mode,
batching, sessions and γ with the figures of :class:`~specd.daemon.capacity.Cell`; ``budget`` marks the
cells under the goodput budget), ``headline`` (per N, batched: speculative ÷ cloud-only aggregate
tokens/s and device-seconds per 1000 tokens, for the best fixed γ and under the budget, each with its p99
round latency; see :func:`headline`), and ``batching_speedup`` (``{mode: {sessions: batched aggregate ÷
one-session-per-forward aggregate}}`` where both were measured).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specd.daemon.capacity import Cell

_COLUMNS = (("mode", "mode"), ("sessions", "N"), ("gamma", "γ"), ("aggregate_tps", "tok/s all"),
            ("per_user_tps", "tok/s user"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
            ("device_s_per_1k", "dev-s/1k"), ("acceptance", "accept"), ("verified_gamma", "verified"),
            ("mean_width", "width"), ("mean_batch", "batch"))


def label(cell: Cell) -> str:
    return cell.mode + (" budget" if cell.budget else "") + ("" if cell.batched else " (1/forward)")


def headline(cells: list[Cell]) -> list[dict[str, Any]]:
    """Per N (batched cells): cloud-only, the best fixed γ (most aggregate tokens/s) and the budget, each as
    speculative ÷ cloud-only aggregate tokens/s, device-seconds per 1000 tokens and p99 round latency."""
    rows = []
    for n in sorted({c.sessions for c in cells}):
        at_n = [c for c in cells if c.sessions == n and c.batched]
        cloud = next((c for c in at_n if c.mode == "cloud"), None)
        fixed = [c for c in at_n if c.mode == "speculative" and not c.budget]
        best = max(fixed, key=lambda c: c.aggregate_tps, default=None)
        budget = next((c for c in at_n if c.budget), None)
        row: dict[str, Any] = {"sessions": n}
        for name, cell in (("cloud", cloud), ("best_fixed", best), ("budget", budget)):
            if cell is None:
                continue
            row[name] = {"gamma": cell.gamma, "aggregate_tps": cell.aggregate_tps, "p99_ms": cell.p99_ms,
                         "device_s_per_1k": cell.device_s_per_1k, "verified_gamma": cell.verified_gamma}
            if cloud is not None and name != "cloud":
                row[name]["vs_cloud"] = round(cell.aggregate_tps / cloud.aggregate_tps, 3)
        if best is not None and budget is not None:
            row["budget_vs_best_fixed"] = round(budget.aggregate_tps / best.aggregate_tps, 3)
        rows.append(row)
    return rows


def _headline_rows(cells: list[Cell]) -> tuple[list[str], list[list[str]]]:
    header = ["N", "cloud tok/s", "cloud dev-s/1k (p99 ms)", "best fixed γ: ×cloud (p99 ms)", "dev-s/1k",
              "budget: ×cloud (p99 ms)", "dev-s/1k", "budget ÷ best"]
    rows = []
    for row in headline(cells):
        cloud, best, budget = row.get("cloud"), row.get("best_fixed"), row.get("budget")
        rows.append([
            str(row["sessions"]),
            f"{cloud['aggregate_tps']:.1f}" if cloud else "-",
            f"{cloud['device_s_per_1k']:.2f} ({cloud['p99_ms']:.0f})" if cloud else "-",
            f"γ {best['gamma']}: {best.get('vs_cloud', 0):.2f}× ({best['p99_ms']:.0f})" if best else "-",
            f"{best['device_s_per_1k']:.2f}" if best else "-",
            f"{budget.get('vs_cloud', 0):.2f}× ({budget['p99_ms']:.0f})" if budget else "-",
            f"{budget['device_s_per_1k']:.2f}" if budget else "-",
            f"{row['budget_vs_best_fixed']:.2f}×" if "budget_vs_best_fixed" in row else "-",
        ])
    return header, rows


def headline_table(cells: list[Cell]) -> str:
    header, rows = _headline_rows(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in [header, *rows])


def batching_speedup(cells: list[Cell]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    alone = {(c.mode, c.sessions, c.gamma, c.budget): c for c in cells if not c.batched}
    for cell in cells:
        other = alone.get((cell.mode, cell.sessions, cell.gamma, cell.budget))
        if cell.batched and other is not None:
            key = f"{cell.mode}" + (f" γ={cell.gamma}" if cell.gamma else "")
            out.setdefault(key, {})[str(cell.sessions)] = round(cell.aggregate_tps / other.aggregate_tps, 3)
    return out


def _rows(cells: list[Cell]) -> list[list[str]]:
    rows = []
    for cell in cells:
        values = cell.to_json() | {"mode": label(cell)}
        rows.append(["-" if values[key] is None else (f"{values[key]:g}" if isinstance(values[key], float)
                                                       else str(values[key])) for key, _ in _COLUMNS])
    return rows


def table(cells: list[Cell]) -> str:
    header = [title for _, title in _COLUMNS]
    rows = _rows(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    return "\n".join(lines)


def write_outputs(cells: list[Cell], meta: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "cells": [c.to_json() for c in cells], "headline": headline(cells),
              "batching_speedup": batching_speedup(cells)}
    paths = [folder / "capacity.json", folder / "capacity.md"]
    paths[0].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(report, cells), encoding="utf-8")
    png = _plot(cells, meta, folder / "capacity.png")
    return paths + ([png] if png else [])


def markdown(report: dict[str, Any], cells: list[Cell]) -> str:
    meta = report["meta"]
    header = [title for _, title in _COLUMNS]
    lines = [f"# specd-verifier capacity: {meta['target']} on {meta['device']}", "",
             f"`{meta['command']}`", "",
             f"Draft rounds replayed from `{meta['recording']}` ({meta['recorded_draft']}, recorded at "
             f"γ = {meta['recorded_gamma']}). {meta['tokens']} new tokens per session at least: every session stays "
             "busy until each has them. Round latency is one verify (speculative) or one step (cloud-only), "
             "queueing included. "
             + ("The speculative cells share one pooled acceptance, in the order of the table, as one "
                "verifier's sessions do: a budget session starts from the rounds judged before it."
                if meta.get("shared_population") else
                "Every cell's acceptance starts from the prior, as a verifier just started (--fresh-population).")
             + (f" Each cell combines {meta['repeat']} passes (--repeat {meta['repeat']}): each N's cells were "
                "measured in turn, pass after pass, and a cell's tokens and seconds summed over its passes; p50 is "
                "the median of the passes' and p99 the worst pass's." if meta.get("repeat", 1) > 1 else ""),
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(cells)]
    head, rows = _headline_rows(cells)
    if any(row[3] != "-" or row[5] != "-" for row in rows):
        lines += ["", "Per N, batched: speculative ÷ cloud-only aggregate tokens/s (p99 round latency in ms) and "
                  "device-seconds per 1000 tokens, for the best fixed γ of this run and under the goodput budget:",
                  "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    if report["batching_speedup"]:
        lines += ["", "Batched aggregate tokens/s ÷ one session per forward, same run:", ""]
        for mode, by_n in report["batching_speedup"].items():
            lines.append(f"- {mode}: " + ", ".join(f"N={n}: {ratio:.2f}×" for n, ratio in by_n.items()))
    return "\n".join(lines) + "\n"


def _plot(cells: list[Cell], meta: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None  # matplotlib comes with the `bench` extra; the JSON and Markdown are written anyway
    fig, (tps, p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[Cell]] = {}
    for cell in cells:
        series.setdefault(label(cell) + (f" γ={cell.gamma}" if cell.gamma and not cell.budget else ""),
                          []).append(cell)
    for name, group in series.items():
        group.sort(key=lambda c: c.sessions)
        xs = [c.sessions for c in group]
        tps.plot(xs, [c.aggregate_tps for c in group], marker="o", label=name)
        p99.plot(xs, [c.p99_ms for c in group], marker="o", label=name)
    for axis, title in ((tps, "aggregate verified tokens/s"), (p99, "p99 round latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent sessions")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    tps.legend(fontsize=8)
    fig.suptitle(f"{meta['target']} on {meta['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
