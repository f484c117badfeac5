"""PNG figures of a bench report (matplotlib, drawn off-screen): speedup against RTT per mode, the stacked
time breakdown per mode, and acceptance by draft position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from specd.desktop.bench.figures import BASELINE, MODES, SPEC_MODES

COLOURS = {"cloud-only": "#7f7f7f", "edge-only": "#bcbd22", "spec-fixed": "#1f77b4", "spec-adaptive": "#ff7f0e",
           "spec-pipelined": "#2ca02c", "spec-no-context": "#9467bd"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict[str, Any], folder: Path) -> dict[str, str]:
    """Draw every plot that has data into ``folder``; returns ``{title: file name}`` (empty without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    for title, name, draw in (("Speedup against cloud-only by RTT", "speedup_vs_rtt.png", _speedup_vs_rtt),
                              ("Where the time goes", "time_breakdown.png", _time_breakdown),
                              ("Acceptance by draft position", "acceptance_by_position.png", _acceptance)):
        fig = draw(plt, report)
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        made[title] = name
    return made


def _speedup_vs_rtt(plt, report: dict[str, Any]):
    by_device = report["speedup_by_rtt"]
    if not by_device:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    multi = len(by_device) > 1
    plotted = False
    for device, rtts in by_device.items():
        xs = [float(r) for r in rtts]
        for mode in SPEC_MODES:  # edge-only is the draft model's own (different) output: in the tables only
            ys = [rtts[r].get(mode) for r in rtts]
            points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if not points:
                continue
            label = f"{mode} ({device})" if multi else mode
            ax.plot(*zip(*points, strict=True), marker="o", label=label, color=COLOURS[mode],
                    linestyle="-" if device == next(iter(by_device)) else "--")
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.axhline(1.0, color=COLOURS[BASELINE], linewidth=1, linestyle=":", label="cloud-only (1×)")
    ax.set_xlabel("added round trip (ms)")
    ax.set_ylabel("speedup against cloud-only (tokens/s)")
    ax.set_title("Speedup against cloud-only, same run")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def _time_breakdown(plt, report: dict[str, Any]):
    ref = report["reference"]
    cells = report["by_rtt"].get(ref["device"], {}).get(f"{ref['rtt_ms']:g}", {}) if ref["device"] else {}
    modes = [m for m in MODES if m in cells]
    if not modes:
        return None
    parts = (("draft_ms", "draft (edge)", "#bcbd22"), ("network_ms", "network", "#17becf"),
             ("verify_ms", "verify (target)", "#d62728"), ("other_ms", "other", "#c7c7c7"))
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    bottoms = [0.0] * len(modes)
    for key, label, colour in parts:
        values = [cells[m][key] / 1000.0 for m in modes]
        ax.bar(modes, values, bottom=bottoms, label=label, color=colour)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.scatter(modes, [cells[m]["latency_ms"] / 1000.0 for m in modes], marker="_", s=600, color="black",
               zorder=3, label="end-to-end latency")
    ax.set_ylabel("seconds per answer")
    ax.set_title(f"Time per answer by component ({ref['device']}, +{ref['rtt_ms']:g} ms RTT)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", labelsize=8)
    return fig


def _acceptance(plt, report: dict[str, Any]):
    ref = report["reference"]
    cells = report["by_rtt"].get(ref["device"], {}).get(f"{ref['rtt_ms']:g}", {}) if ref["device"] else {}
    series = {m: cells[m]["acceptance_by_position"] for m in SPEC_MODES if m in cells
              and cells[m]["acceptance_by_position"]}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, rates in series.items():
        ax.plot(range(1, len(rates) + 1), rates, marker="o", label=mode, color=COLOURS[mode])
    ax.set_xlabel("draft position in the round")
    ax.set_ylabel("accepted ÷ drafted at this position")
    ax.set_ylim(0, 1.02)
    ax.set_title("Acceptance by draft position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
