"""The one-line summary of an answer's stats, shown by `specd chat`, the chat window and `specd bench`.

It reads the ``stats`` object of ``--json`` (``AnswerStats.to_json()``), so the three show one wording and
an answer saved as JSON reads the same. Callers add their own prefix (the bench its cell, the demo its mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def stats_line(stats: Mapping[str, Any], finish_reason: str | None) -> str:
    """``42 tokens · 18.3 tok/s · speculative · acceptance 79% · mean γ 4.2 · 2.10 tok/forward ·
    30 speculative in 1.2 s · 12 cloud in 0.4 s · cpu (onnxruntime-genai, int8) · finish eos``.

    The split by mode appears when a speculative answer let the verifier stream part of it; an answer the
    verifier never saw says ``drafted locally`` instead of acceptance and γ.
    """
    mode = str(stats.get("mode", ""))
    parts = [f"{stats.get('generated', 0)} tokens", f"{stats.get('tokens_per_second', 0.0):.1f} tok/s", mode]
    local = stats.get("local_tokens", 0)
    if stats.get("rounds"):
        parts += [f"acceptance {stats.get('acceptance_rate', 0.0):.0%}", f"mean γ {stats.get('gamma_mean', 0.0):.1f}",
                  f"{stats.get('tokens_per_forward', 0.0):.2f} tok/forward"]
        looked_up = (stats.get("proposed_by_source") or {}).get("context", 0)
        if looked_up:
            parts.append(f"{stats['accepted_by_source']['context']}/{looked_up} looked-up drafts accepted")
    elif local and mode != "cloud-only":
        parts.append("drafted locally")
    if mode != "cloud-only" and stats.get("cloud_tokens"):
        parts += [f"{stats.get('speculative_tokens', 0)} speculative in {stats.get('speculative_s', 0.0):.1f} s",
                  f"{stats['cloud_tokens']} cloud in {stats.get('cloud_s', 0.0):.1f} s"]
    if local and stats.get("rounds"):
        parts.append(f"{local} drafted locally")
    if stats.get("device"):
        built = filter(None, (stats.get("backend"), stats.get("draft_precision")))  # "onnxruntime-genai, int8"
        parts.append(f"{stats['device']} ({', '.join(built)})")
    if finish_reason:
        parts.append(f"finish {finish_reason}")
    return " · ".join(p for p in parts if p)
