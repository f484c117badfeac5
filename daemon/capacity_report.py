"""The outputs of ``specd-verifier capacity``: a terminal table, ``capacity.json``, ``capacity.md``, ``capacity.png``.

JSON layout: ``meta`` (target, device, dtype, recording, command), ``cells`` (one object per mode,
batching, sessions and γ with the figures of :class:`~specd.daemon.capacity.Cell`), and
``batching_speedup`` (``{mode: {sessions: batched aggregate ÷ one-session-per-forward aggregate}}`` where
both were measured).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specd.daemon.capacity import Cell

_COLUMNS = (("mode", "mode"), ("sessions", "N"), ("gamma", "γ"), ("aggregate_tps", "tok/s all"),
            ("per_user_tps", "tok/s user"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
            ("device_s_per_1k", "dev-s/1k"), ("acceptance", "accept"), ("mean_batch", "batch"))


def label(cell: Cell) -> str:
    return cell.mode + ("" if cell.batched else " (1/forward)")


def batching_speedup(cells: list[Cell]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    alone = {(c.mode, c.sessions, c.gamma): c for c in cells if not c.batched}
    for cell in cells:
        other = alone.get((cell.mode, cell.sessions, cell.gamma))
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
    report = {"meta": meta, "cells": [c.to_json() for c in cells], "batching_speedup": batching_speedup(cells)}
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
             f"γ = {meta['recorded_gamma']}). {meta['tokens']} new tokens per session; round latency is one "
             "verify (speculative) or one step (cloud-only), queueing included.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(cells)]
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
        series.setdefault(label(cell) + (f" γ={cell.gamma}" if cell.gamma else ""), []).append(cell)
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
