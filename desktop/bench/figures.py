"""From the statistics of single answers to the figures of a mode: speedup, acceptance, time breakdown.

An answer's statistics are :meth:`specd.desktop.client.answer.AnswerStats.to_json` dicts, so everything here is
plain data and testable without models.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

MODES: tuple[str, ...] = ("cloud-only", "edge-only", "spec-fixed", "spec-adaptive", "spec-pipelined",
                          "spec-no-context")
SPEC_MODES: tuple[str, ...] = ("spec-fixed", "spec-adaptive", "spec-pipelined", "spec-no-context")
# spec-no-context (the product's mode with ``[speculation] context_proposer = false``) is asked for by name.
DEFAULT_MODES: tuple[str, ...] = MODES[:5]
BASELINE = "cloud-only"


@dataclass(slots=True)
class RunRecord:
    """One measured answer."""

    device: str
    rtt_ms: float
    mode: str
    prompt_id: str
    category: str
    iteration: int
    seed: int
    stats: dict[str, Any]
    token_ids: list[int]
    finish_reason: str | None
    text: str = ""
    prompt_set: str = "standard"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class SessionsRecord:
    """N edge clients answering concurrently against one verifier."""

    sessions: int
    mode: str
    rtt_ms: float
    wall_s: float
    generated: int
    verified: int
    per_session_tokens_per_second: list[float] = field(default_factory=list)

    @property
    def total_verified_tokens_per_second(self) -> float:
        return self.verified / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_verified_tokens_per_second"] = self.total_verified_tokens_per_second
        return data


def assessment(acceptance_rate: float) -> str:
    """The original runner's verdict on an acceptance rate."""
    if acceptance_rate > 0.5:
        return "EXCELLENT"
    if acceptance_rate > 0.3:
        return "GOOD"
    if acceptance_rate > 0.1:
        return "MODERATE"
    return "POOR"


def expected_tokens_per_round(alpha: float, gamma: float) -> float:
    """``(1 − α^(γ+1)) / (1 − α)``: tokens one target forward yields with γ drafts of acceptance α."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1.0)) / (1.0 - alpha)


def per_token_alpha(accepted_by_position: list[int], drafted_by_position: list[int]) -> float:
    """α estimated position by position: accepted ÷ tried, where a draft is *tried* when every earlier draft of
    its round was accepted (drafts after a rejection are not tested). Rounds are only counted in aggregate, so
    the drafts at position i tried are estimated as ``drafted[i] × accepted[i−1] / drafted[i−1]``: exact for a
    fixed γ, and unbiased when γ does not depend on the round's own draws (adaptive γ depends on earlier
    rounds only)."""
    accepted = 0
    tried = 0.0
    for i, drafted in enumerate(drafted_by_position):
        reach = 1.0
        if i > 0:
            reach = accepted_by_position[i - 1] / drafted_by_position[i - 1] if drafted_by_position[i - 1] else 0.0
        tried += drafted * reach
        accepted += accepted_by_position[i]
    return accepted / tried if tried else 0.0


def _sum_lists(lists: list[list[int]]) -> list[int]:
    out: list[int] = []
    for values in lists:
        out.extend([0] * (len(values) - len(out)))
        for i, v in enumerate(values):
            out[i] += v
    return out


def mode_figures(records: list[RunRecord]) -> dict[str, Any]:
    """The figures of one (device, RTT, mode) cell from its answers."""
    stats = [r.stats for r in records]
    n = len(stats)
    generated = sum(s["generated"] for s in stats)
    total_s = sum(s["total_ms"] for s in stats) / 1000.0
    drafted = sum(s["drafted"] for s in stats)
    accepted = sum(s["accepted"] for s in stats)
    rounds = sum(s["rounds"] for s in stats)
    forwards = sum(s["target_forwards"] for s in stats)
    verified = generated - sum(s.get("local_tokens", 0) for s in stats)
    acc_pos = _sum_lists([s["accepted_by_position"] for s in stats])
    drf_pos = _sum_lists([s["drafted_by_position"] for s in stats])
    alpha = per_token_alpha(acc_pos, drf_pos)
    gammas = [g for s in stats for g in s["gammas"]]
    theory = statistics.fmean(expected_tokens_per_round(alpha, g) for g in gammas) if gammas else 0.0
    latency = [s["total_ms"] for s in stats]
    draft_ms = sum(s["edge_ms"] for s in stats) / n
    network_ms = sum(s["network_ms"] for s in stats) / n
    verify_ms = sum(s["verify_ms"] for s in stats) / n
    latency_ms = statistics.fmean(latency)
    wire = sum(s["bytes_sent"] + s["bytes_received"] for s in stats)
    acceptance_rate = accepted / drafted if drafted else 0.0
    tpf = verified / forwards if forwards else 0.0
    return {
        "answers": n,
        "generated_tokens": generated,
        "latency_ms": latency_ms,
        "latency_ms_stdev": statistics.stdev(latency) if n > 1 else 0.0,
        "ttft_ms": statistics.fmean(s["ttft_ms"] for s in stats),
        "tokens_per_second": generated / total_s if total_s > 0 else 0.0,
        "acceptance_rate": acceptance_rate,
        "alpha": alpha,
        "accepted_per_round": accepted / rounds if rounds else 0.0,
        "rounds": rounds,
        "gamma_mean": statistics.fmean(gammas) if gammas else 0.0,
        "target_forwards": forwards,
        "tokens_per_forward": tpf,
        "theoretical_tokens_per_forward": theory,
        "tokens_per_forward_vs_theory": tpf / theory if theory else 0.0,
        "draft_ms": draft_ms,
        "network_ms": network_ms,
        "verify_ms": verify_ms,
        "verify_ms_per_forward": verify_ms * n / forwards if forwards else 0.0,
        "other_ms": max(0.0, latency_ms - draft_ms - network_ms - verify_ms),
        "bytes_per_token": wire / generated if generated else 0.0,
        "acceptance_by_position": [a / d if d else 0.0 for a, d in zip(acc_pos, drf_pos, strict=True)],
        "drafted_by_position": drf_pos,
        "assessment": assessment(acceptance_rate) if drafted else None,
        "local_tokens": generated - verified,
        # The mode chooser's decisions (answer stats' ``mode_switches``): tokens the verifier streamed alone
        # within speculative answers, probes, and switches from rounds to streaming.
        "streamed_tokens": sum(s.get("cloud_tokens", 0) for s in stats if s.get("mode") == "speculative"),
        "probes": sum(1 for s in stats for d in s.get("mode_switches", []) if d["to"] == "probe"),
        "switches_to_streaming": sum(1 for s in stats for d in s.get("mode_switches", []) if d["to"] == "streaming"),
        "finish_reasons": sorted({str(r.finish_reason) for r in records}),
    }


def same_output_fraction(records: list[RunRecord], baseline: list[RunRecord]) -> float | None:
    """The share of answers whose tokens equal cloud-only's for the same prompt, iteration and seed."""
    reference = {(r.prompt_id, r.iteration, r.seed): r.token_ids for r in baseline}
    pairs = [(r.token_ids, reference[(r.prompt_id, r.iteration, r.seed)]) for r in records
             if (r.prompt_id, r.iteration, r.seed) in reference]
    if not pairs:
        return None
    return sum(a == b for a, b in pairs) / len(pairs)


def summarise(records: list[RunRecord]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``{device: {rtt: {mode: figures}}}`` with ``speedup`` against cloud-only at the same RTT.

    cloud-only does not involve the edge device, so it is measured once per RTT and shared by devices.
    """
    devices = list(dict.fromkeys(r.device for r in records if r.mode != BASELINE)) or ["-"]
    rtts = list(dict.fromkeys(r.rtt_ms for r in records))
    out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for device in devices:
        per_rtt: dict[str, dict[str, dict[str, Any]]] = {}
        for rtt in rtts:
            base = [r for r in records if r.mode == BASELINE and r.rtt_ms == rtt]
            base_tps = mode_figures(base)["tokens_per_second"] if base else 0.0
            cells: dict[str, dict[str, Any]] = {}
            for mode in MODES:
                chosen = [r for r in records if r.mode == mode and r.rtt_ms == rtt
                          and (mode == BASELINE or r.device == device)]
                if not chosen:
                    continue
                fig = mode_figures(chosen)
                fig["speedup"] = fig["tokens_per_second"] / base_tps if base_tps else None
                fig["same_tokens_as_cloud_only"] = same_output_fraction(chosen, base) if base else None
                cells[mode] = fig
            per_rtt[_rtt_key(rtt)] = cells
        out[device] = per_rtt
    return out


def _rtt_key(rtt: float) -> str:
    return f"{rtt:g}"


def product_mode(speculation: dict[str, Any]) -> str:
    """The bench mode that runs what a ``[speculation]`` section configures (the default: adaptive + pipelined)."""
    if speculation.get("gamma", "auto") != "auto":
        return "spec-fixed"
    return "spec-pipelined" if speculation.get("pipeline", True) else "spec-adaptive"


def worst_cells(by_rtt: dict[str, dict[str, dict[str, dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    """``{mode: {device, rtt_ms, speedup}}``: each speculative mode's lowest speedup against cloud-only over
    every device and RTT measured (the cell where it comes closest to being slower than cloud-only)."""
    worst: dict[str, dict[str, Any]] = {}
    for device, rtts in by_rtt.items():
        for rtt, cells in rtts.items():
            for mode, fig in cells.items():
                speedup = fig.get("speedup")
                if mode not in SPEC_MODES or speedup is None:
                    continue
                if mode not in worst or speedup < worst[mode]["speedup"]:
                    worst[mode] = {"device": device, "rtt_ms": float(rtt), "speedup": speedup}
    return {mode: worst[mode] for mode in SPEC_MODES if mode in worst}


def worst_cell_line(worst: dict[str, dict[str, Any]], mode: str) -> str:
    """``Worst cell: spec-pipelined 0.97× cloud-only (cpu @ +200 ms); other modes' worst: …``; empty when
    no speculative mode was measured against cloud-only."""
    if not worst:
        return ""
    headline = mode if mode in worst else next(iter(worst))

    def cell(name: str) -> str:
        w = worst[name]
        return f"{name} {w['speedup']:.2f}× cloud-only ({w['device']} @ +{w['rtt_ms']:g} ms)"

    line = f"Worst cell: {cell(headline)}"
    others = [cell(name) for name in worst if name != headline]
    return line + ("; other modes' worst: " + ", ".join(others) if others else "")
