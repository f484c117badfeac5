"""The benchmark's outputs: one JSON document with every figure, and a Markdown report.

JSON layout (documented in docs/bench.md):

- ``speedup``: ``{mode: tokens/s of the mode ÷ tokens/s of cloud-only}`` at the first device and RTT;
- ``acceptance``: ``{mode: accepted ÷ drafted}`` likewise (speculative modes);
- one key per measured mode (``"cloud-only"``, ``"spec-adaptive"`` …) with all its figures there;
- ``by_rtt``: ``{device: {rtt_ms: {mode: figures}}}`` for every device and RTT;
- ``devices``, ``multi_session``, ``hf_assisted``, ``meta`` and the raw ``runs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specd.desktop.bench.figures import (
    BASELINE,
    MODES,
    SPEC_MODES,
    product_mode,
    summarise,
    worst_cell_line,
    worst_cells,
)
from specd.desktop.bench.runner import BenchResult


def build_report(result: BenchResult, meta: dict[str, Any], hf_assisted: dict[str, Any] | None = None) -> dict:
    by_rtt = summarise(result.records)
    first_device = next(iter(by_rtt), None)
    first_rtt = next(iter(by_rtt[first_device]), None) if first_device else None
    cells = by_rtt[first_device][first_rtt] if first_device and first_rtt is not None else {}
    report: dict[str, Any] = {
        "speedup": {mode: fig["speedup"] for mode, fig in cells.items()},
        "acceptance": {mode: fig["acceptance_rate"] for mode, fig in cells.items() if mode in SPEC_MODES},
    }
    for mode, fig in cells.items():
        report[mode] = fig
    worst = worst_cells(by_rtt)
    headline = product_mode(meta.get("config", {}).get("speculation", {}))
    headline = headline if headline in worst else next(iter(worst), headline)
    report.update({
        "worst_cell": {"mode": headline, **worst[headline]} if headline in worst else None,
        "worst_cell_by_mode": worst,
        "worst_cell_summary": worst_cell_line(worst, headline),
        "reference": {"device": first_device, "rtt_ms": float(first_rtt) if first_rtt is not None else None},
        "by_rtt": by_rtt,
        "speedup_by_rtt": {device: {rtt: {m: f["speedup"] for m, f in modes.items()} for rtt, modes in rtts.items()}
                           for device, rtts in by_rtt.items()},
        "devices": [{"requested": d.requested, "device": d.label, "error": d.error, "choice": d.detail or None,
                     "draft_precision": d.detail.get("draft_precision") or None,
                     "draft_precision_reason": d.detail.get("draft_precision_reason") or None}
                    for d in result.devices],
        "multi_session": [s.to_json() for s in result.sessions],
        "hf_assisted": hf_assisted,
        "meta": {**meta, "wall_s": result.wall_s, "verifier": result.welcome},
        "runs": [r.to_json() for r in result.records],
    })
    sets = list(dict.fromkeys(r.prompt_set for r in result.records))
    per_set = {name: summarise([r for r in result.records if r.prompt_set == name]) for name in sets}
    report["by_prompt_set"] = per_set if len(sets) > 1 else {}
    report["context_proposer_gain"] = {name: context_gain(cells) for name, cells in per_set.items()}
    return report


def context_gain(by_rtt: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, float]]:
    """``{device: {rtt: ratio}}``: tok/s of spec-pipelined (context proposer on, the default) over spec-no-context
    (off), where both were measured."""
    gain: dict[str, dict[str, float]] = {}
    for device, rtts in by_rtt.items():
        for rtt, cells in rtts.items():
            on, off = cells.get("spec-pipelined"), cells.get("spec-no-context")
            if on and off and off["tokens_per_second"] > 0:
                gain.setdefault(device, {})[rtt] = on["tokens_per_second"] / off["tokens_per_second"]
    return gain


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- Markdown ---------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def mode_table(cells: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["| mode | latency (s) | tok/s | speedup | acceptance | assessment | accepted/round | γ̄ | "
             "tok/forward (theory) | draft ms | network ms | verify ms | ms/forward | other ms | bytes/tok | "
             "same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        fig = cells.get(mode)
        if fig is None:
            continue
        spec = mode in SPEC_MODES
        tpf = (f"{fig['tokens_per_forward']:.2f} ({fig['theoretical_tokens_per_forward']:.2f})" if spec
               else _f(fig["tokens_per_forward"], 2) if fig["target_forwards"] else "–")
        lines.append(
            f"| {mode} | {fig['latency_ms'] / 1000:.2f} | {fig['tokens_per_second']:.1f} | "
            f"{_f(fig['speedup'], 2, '×')} | {_pct(fig['acceptance_rate']) if spec else '–'} | "
            f"{fig['assessment'] or '–'} | {_f(fig['accepted_per_round'], 2) if spec else '–'} | "
            f"{_f(fig['gamma_mean'], 1) if spec else '–'} | {tpf} | {fig['draft_ms']:.0f} | {fig['network_ms']:.0f} | "
            f"{fig['verify_ms']:.0f} | {_f(fig['verify_ms_per_forward'], 0) if fig['target_forwards'] else '–'} | "
            f"{fig['other_ms']:.0f} | {_f(fig['bytes_per_token'], 0)} | "
            f"{_pct(fig['same_tokens_as_cloud_only']) if mode != BASELINE else '–'} |")
    return lines


def markdown(report: dict, plots: dict[str, str] | None = None) -> str:
    meta = report["meta"]
    out = [f"# specd bench — {meta.get('title', 'report')}", ""]
    out += [f"- **Command**: `{meta.get('command', '')}`",
            f"- **When**: {meta.get('started', '')}; took {meta.get('wall_s', 0):.0f} s",
            f"- **Machine**: {meta.get('machine', '')}",
            f"- **Target (verifier)**: {meta.get('target', '')}; **draft**: {meta.get('draft', '')}",
            f"- **Placement**: {meta.get('pinning', '')}",
            f"- **Settings**: {meta.get('settings', '')}",
            f"- **Prompts**: {meta.get('prompts', '')}; {meta.get('iterations', '')} iteration(s) each; modes take "
            "turns prompt by prompt",
            f"- **Network**: {meta.get('network', '')}", ""]
    for device, rtts in report["by_rtt"].items():
        for rtt, cells in rtts.items():
            out += [f"## {device} · {rtt} ms added round trip", ""]
            out += mode_table(cells)
            out.append("")
    out += _speedup_vs_rtt(report)
    out += _prompt_sets(report)
    if report.get("worst_cell_summary"):
        out += [f"**{report['worst_cell_summary']}** (the lowest speedup against cloud-only over every device and "
                "RTT; the first mode is the one the config runs)", ""]
    out += _decisions(report)
    out += _devices(report)
    out += _sessions(report)
    out += _hf(report.get("hf_assisted"))
    if plots:
        out += ["## Plots", ""]
        out += [f"![{name}]({path})" for name, path in plots.items()]
        out.append("")
    out += ["## How to read this", "",
            "- **speedup** is tokens/s of the mode divided by tokens/s of cloud-only measured in the same run at the "
            "same RTT; **acceptance** is accepted ÷ drafted tokens (the original runner's figure; its assessment: "
            "EXCELLENT > 50 %, GOOD > 30 %, MODERATE > 10 %, POOR below).",
            "- **tok/forward** is verified tokens per target forward pass; *theory* is the mean over rounds of "
            "(1 − α^(γ+1)) / (1 − α) with α the per-token acceptance estimated position by position. The last round "
            "of an answer is cut short by the token limit or end of text, so measured values sit a little below.",
            "- **draft / network / verify ms** are per answer: edge drafting time, round-trip time outside the "
            "verifier, and the verifier's queue + forward time; with pipelining the draft time overlaps the other "
            "two, so the parts can add up to more than the latency. *other* is the rest (tokenising, scheduling). "
            "*ms/forward* is the verifier's time per target forward pass: one token for cloud-only, γ + 1 for "
            "speculative rounds.",
            "- **same tokens** is the share of answers identical token for token to cloud-only's for the same "
            "prompt and seed. At temperature 0 it must be 100 % for the speculative modes (the output is "
            "lossless); with sampling, speculative and cloud-only answers follow the same distribution but draw "
            "from different random streams, so they differ.",
            "- cloud-only is one streamed request, so its added round trip shows under *other*, not *network*.",
            ""]
    return "\n".join(out)


def _prompt_sets(report: dict) -> list[str]:
    """Each prompt set's speedups side by side, and what the context proposer gained on each."""
    out: list[str] = []
    for name, by_rtt in (report.get("by_prompt_set") or {}).items():
        out += [f"## Prompt set: {name}", "", "| device | added RTT | " + " | ".join(
            m for m in MODES if m != BASELINE) + " |", "|---|---|" + "---|" * (len(MODES) - 1)]
        for device, rtts in by_rtt.items():
            for rtt, cells in rtts.items():
                row = [_f(cells[m]["speedup"], 2, "×") if m in cells else "–" for m in MODES if m != BASELINE]
                out.append(f"| {device} | {rtt} ms | " + " | ".join(row) + " |")
        out.append("")
    gains = {name: g for name, g in (report.get("context_proposer_gain") or {}).items() if g}
    if gains:
        out += ["## Context proposer: spec-pipelined (on) ÷ spec-no-context (off), tok/s", ""]
        for name, devices in gains.items():
            for device, rtts in devices.items():
                cells = ", ".join(f"{ratio:.2f}× at +{rtt} ms" for rtt, ratio in rtts.items())
                out.append(f"- {name} prompts, {device}: {cells}")
        out.append("")
    return out


def _speedup_vs_rtt(report: dict) -> list[str]:
    rows = report["speedup_by_rtt"]
    if not any(len(r) > 1 for r in rows.values()):
        return []
    out = ["## Speedup against cloud-only by added RTT", ""]
    for device, rtts in rows.items():
        modes = [m for m in MODES if any(m in cells for cells in rtts.values()) and m != BASELINE]
        out += [f"**{device}**", "", "| RTT ms | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
        for rtt, cells in rtts.items():
            out.append(f"| {rtt} | " + " | ".join(_f(cells.get(m), 2, "×") for m in modes) + " |")
        out.append("")
    return out


def _decisions(report: dict) -> list[str]:
    """Where the mode chooser streamed: per cell, the tokens streamed, probes and switches, and the rates that
    decided the first switch to streaming (from the answers' ``mode_switches``)."""
    first_switch: dict[tuple[str, str, str], str] = {}
    for run in report["runs"]:
        key = (run["device"], f"{run['rtt_ms']:g}", run["mode"])
        decision = next((d for d in run["stats"].get("mode_switches", []) if d["to"] == "streaming"), None)
        if decision is not None and key not in first_switch:
            first_switch[key] = (f"{run['prompt_id']} #{run['iteration'] + 1} at token {decision['at_token']}: "
                                 f"{decision['speculative_tok_s']} vs {decision['streaming_tok_s']} tok/s "
                                 f"(γ {decision['gamma']})")
    rows = []
    for device, rtts in report["by_rtt"].items():
        for rtt, cells in rtts.items():
            for mode, fig in cells.items():
                if mode in SPEC_MODES and (fig.get("probes") or fig.get("switches_to_streaming")
                                           or fig.get("streamed_tokens")):
                    rows.append(f"| {device} | {rtt} | {mode} | {fig['streamed_tokens']} of {fig['generated_tokens']}"
                                f" | {fig['probes']} | {fig['switches_to_streaming']} | "
                                f"{first_switch.get((device, rtt, mode), '–')} |")
    if not rows:
        return []
    return ["## Mode decisions (rounds or the verifier streaming alone)", "",
            "| device | RTT ms | mode | tokens streamed | probes | switches to streaming | first switch: speculative "
            "vs streaming rate |", "|---|---|---|---|---|---|---|", *rows, "",
            "Each answer's full trace is in bench.json (`runs[].stats.mode_switches`).", ""]


def _devices(report: dict) -> list[str]:
    devices = report["devices"]
    if len(devices) < 2:
        return []
    out = ["## Devices compared", "", "| device | requested | mode | tok/s | speedup | acceptance | draft ms/answer |",
           "|---|---|---|---|---|---|---|"]
    first_rtt = next(iter(next(iter(report["by_rtt"].values()))), None)
    for d in devices:
        if d["error"]:
            out.append(f"| {d['device']} | {d['requested']} | – | could not run: {d['error']} | | | |")
            continue
        cells = report["by_rtt"].get(d["device"], {}).get(first_rtt, {})
        for mode, fig in cells.items():
            if mode == BASELINE:
                continue
            out.append(f"| {d['device']} | {d['requested']} | {mode} | {fig['tokens_per_second']:.1f} | "
                       f"{_f(fig['speedup'], 2, '×')} | "
                       f"{_pct(fig['acceptance_rate']) if mode in SPEC_MODES else '–'} | {fig['draft_ms']:.0f} |")
    for d in devices:
        for fallback in (d.get("choice") or {}).get("fallbacks", []):
            out.append(f"\n{d['device']} (asked: {d['requested']}) fell back from {fallback['device']}: "
                       f"{fallback['reason']}")
    return [*out, ""]


def _sessions(report: dict) -> list[str]:
    rows = report["multi_session"]
    if not rows:
        return []
    out = ["## Concurrent edge clients against one verifier", "",
           "| sessions | mode | wall s | verified tokens | total verified tok/s | mean tok/s per session |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        per = r["per_session_tokens_per_second"]
        out.append(f"| {r['sessions']} | {r['mode']} | {r['wall_s']:.2f} | {r['verified']} | "
                   f"{r['total_verified_tokens_per_second']:.1f} | {sum(per) / len(per):.1f} |")
    return [*out, ""]


def _hf(hf: dict[str, Any] | None) -> list[str]:
    if not hf:
        return []
    out = ["## Against transformers' assisted generation (one process, one machine)", ""]
    if hf.get("error"):
        return [*out, f"Not measured: {hf['error']}", ""]
    out += [f"Target {hf['target']}, assistant {hf['assistant']}, {hf['threads']} torch thread(s) on cores "
            f"{hf.get('cpus', '–')}; {hf['answers']} answer(s), {hf['settings']}.", "",
            "| generation | tok/s | speedup vs plain generate |", "|---|---|---|",
            f"| target alone (`generate`) | {hf['plain_tokens_per_second']:.1f} | 1.00× |",
            f"| assisted (`generate(assistant_model=…)`) | {hf['assisted_tokens_per_second']:.1f} | "
            f"{hf['assisted_speedup']:.2f}× |", ""]
    if hf.get("note"):
        out += [hf["note"], ""]
    return out
