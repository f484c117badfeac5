"""The verifier's counters, rendered in the Prometheus text exposition format for ``GET /metrics``.

Kept dependency-free: a handful of counters, gauges and two latency histograms are all we need.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specd.daemon.engine import ForwardStats

# Seconds; forward passes range from ~1 ms (tiny model) to seconds (an 8B prefill on a CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Sessions served by one forward, and the tokens it ran (max_batch_tokens is 512 by default).
SESSION_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for bound, count in zip(self.buckets, self.counts, strict=True):
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                  f"{name}_count {self.count}"]
        return lines


@dataclass(slots=True)
class ClientCounters:
    """What one client key used (daemon/client_auth.py keeps one per key name, across reloads)."""

    name: str
    tokens: int = 0  # prompt tokens run plus tokens generated
    prompt_tokens: int = 0
    rounds: int = 0
    sessions: int = 0  # open now
    sessions_total: int = 0
    last_used: float = 0.0  # wall-clock seconds; 0: never
    refusals: Counter = field(default_factory=Counter)  # by error code


def render_clients(clients: Iterable[ClientCounters]) -> list[str]:
    """The per-key families of ``/metrics``, labelled ``client="NAME"`` (a name, never the key)."""
    clients = sorted(clients, key=lambda c: c.name)
    families = (
        ("specd_client_tokens_total", "counter", "Prompt tokens run plus tokens generated, by client key.", "tokens"),
        ("specd_client_prompt_tokens_total", "counter", "Prompt tokens run, by client key.", "prompt_tokens"),
        ("specd_client_rounds_total", "counter", "Draft rounds verified, by client key.", "rounds"),
        ("specd_client_sessions_total", "counter", "Sessions accepted, by client key.", "sessions_total"),
        ("specd_client_sessions", "gauge", "Open sessions, by client key.", "sessions"),
    )
    lines: list[str] = []
    for name, kind, help_text, attr in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{client="{_label(c.name)}"}} {getattr(c, attr)}' for c in clients]
    lines += ["# HELP specd_client_refusals_total Connections, sessions and requests refused, by client key and "
              "reason.", "# TYPE specd_client_refusals_total counter"]
    for client in clients:
        for reason, count in sorted(client.refusals.items()):
            lines.append(f'specd_client_refusals_total{{client="{_label(client.name)}",reason="{_label(reason)}"}} '
                         f"{count}")
    return lines


@dataclass(slots=True)
class Metrics:
    """Everything ``/metrics`` reports; updated from the event loop only."""

    started_at: float = field(default_factory=time.monotonic)
    sessions: int = 0
    sessions_total: int = 0
    requests: Counter = field(default_factory=Counter)  # by mode
    rounds: int = 0
    discarded: int = 0
    drafted: int = 0
    accepted: int = 0
    unverified: int = 0  # drafts the goodput budget left out of their round
    streamed: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    refusals: Counter = field(default_factory=Counter)  # by error code / HTTP reason
    forward: Histogram = field(default_factory=Histogram)
    queue: Histogram = field(default_factory=Histogram)
    batch_sessions: Histogram = field(default_factory=lambda: Histogram(SESSION_BUCKETS))
    batch_tokens: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))

    def round(self, drafted: int, accepted: int, forward_s: float, queue_s: float, verified: int | None = None) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.unverified += drafted - (drafted if verified is None else verified)
        self.forward.observe(forward_s)
        self.queue.observe(queue_s)

    def batch(self, stats: ForwardStats) -> None:
        """One engine forward: how many sessions it served and how many tokens it ran."""
        self.batch_sessions.observe(stats.sessions)
        self.batch_tokens.observe(stats.tokens)

    @property
    def acceptance_rate(self) -> float:
        judged = self.drafted - self.unverified
        return self.accepted / judged if judged else 0.0

    def render(self, model: str, device: str, clients: Iterable[ClientCounters] = ()) -> str:
        def one(name: str, kind: str, help_text: str, value: float | int) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]

        lines = [
            "# HELP specd_info The target model and device this verifier serves.",
            "# TYPE specd_info gauge",
            f'specd_info{{model="{_label(model)}",device="{_label(device)}"}} 1',
            *one("specd_uptime_seconds", "gauge", "Seconds since the verifier started.",
                 round(time.monotonic() - self.started_at, 3)),
            *one("specd_sessions", "gauge", "Open WebSocket sessions.", self.sessions),
            *one("specd_sessions_total", "counter", "Sessions accepted since start.", self.sessions_total),
            "# HELP specd_requests_total Requests started, by mode.",
            "# TYPE specd_requests_total counter",
        ]
        for mode in ("speculative", "cloud"):
            lines.append(f'specd_requests_total{{mode="{mode}"}} {self.requests[mode]}')
        lines += [
            *one("specd_rounds_total", "counter", "Draft rounds verified.", self.rounds),
            *one("specd_discarded_rounds_total", "counter", "Draft rounds discarded (stale prefix).",
                 self.discarded),
            *one("specd_drafted_tokens_total", "counter", "Draft tokens received in verified rounds.",
                 self.drafted),
            *one("specd_accepted_tokens_total", "counter", "Draft tokens accepted.", self.accepted),
            *one("specd_unverified_drafts_total", "counter",
                 "Draft tokens the goodput budget left unverified (not judged, not rejected).", self.unverified),
            *one("specd_acceptance_rate", "gauge", "Accepted / verified draft tokens since start.",
                 round(self.acceptance_rate, 6)),
            *one("specd_cloud_tokens_total", "counter", "Tokens generated in cloud-only mode.", self.streamed),
            *one("specd_prefill_tokens_total", "counter", "Prompt tokens run through the target at start.",
                 self.prefill_tokens),
            *one("specd_cached_prompt_tokens_total", "counter", "Prompt tokens reused from a session's KV cache.",
                 self.cached_tokens),
            "# HELP specd_refusals_total Connections, requests and frames refused, by reason.",
            "# TYPE specd_refusals_total counter",
        ]
        for reason, count in sorted(self.refusals.items()):
            lines.append(f'specd_refusals_total{{reason="{_label(reason)}"}} {count}')
        lines += self.forward.render("specd_forward_seconds", "Target forward pass and verification time.")
        lines += self.queue.render("specd_queue_seconds", "Time a round waited for its first forward.")
        lines += self.batch_sessions.render("specd_batch_sessions", "Sessions served by one target forward.")
        lines += self.batch_tokens.render("specd_batch_tokens", "Tokens run by one target forward.")
        lines += render_clients(clients)
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
