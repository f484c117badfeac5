"""What one answer cost and how it was made (``--json``'s ``stats``), changed only through methods named for
the events that change it: a verdict, a discarded round, streamed tokens, drafting time, committed tokens…"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from specd.desktop.client.adaptive import Step
from specd.desktop.drafters.base import DraftProposal

Source = Literal["draft", "target", "local", "cloud"]
Mode = Literal["speculative", "local", "cloud-only", "edge-only"]


@dataclass(slots=True)
class AnswerStats:
    mode: Mode = "speculative"
    device: str = ""
    backend: str = ""
    draft_precision: str = ""  # what the draft was built at (int4, int8, …) and why: the loader's pick
    draft_precision_reason: str = ""
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0
    local_tokens: int = 0
    # Tokens by the mode that committed them, and the time each mode took: the wall time from the previous
    # committed tokens (the answer's start, for the first) to the ones it committed.
    speculative_tokens: int = 0
    cloud_tokens: int = 0
    speculative_s: float = 0.0
    cloud_s: float = 0.0
    target_forwards: int = 0
    discarded_rounds: int = 0  # rounds drafted ahead that the verifier discarded (a guess was wrong)
    ahead_rounds: int = 0  # rounds drafted ahead, during the previous round's verification, and sent
    reconnects: int = 0
    cached_prompt_tokens: int = 0
    edge_ms: float = 0.0
    network_ms: float = 0.0
    verify_ms: float = 0.0
    total_ms: float = 0.0
    ttft_ms: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    gammas: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_position: list[int] = field(default_factory=list)
    # Drafts by where they came from: the draft model, or the context lookup (free drafts from the conversation).
    proposed_by_source: dict[str, int] = field(default_factory=lambda: {"model": 0, "context": 0})
    accepted_by_source: dict[str, int] = field(default_factory=lambda: {"model": 0, "context": 0})
    # The mode chooser's decision trace: the answer's first step, every change between rounds and
    # streaming, and every probe, each with the two rates (tok/s) that decided it.
    mode_switches: list[dict[str, Any]] = field(default_factory=list)
    # Streamed tokens the idle drafter scored, and their mean acceptance sample min(1, q/p): what rounds
    # would have been accepted with while the verifier streamed (stream_scoring.py).
    streamed_scored: int = 0
    streamed_acceptance: float = 0.0
    # The context lookup as the model's guess (lookahead.py): looked-up tokens the drafter's forwards fed
    # beyond what they needed, and the model's drafts that came out equal to them, so needed no forward.
    lookahead_fed: int = 0
    looked_ahead_drafts: int = 0

    # -- derived ----------------------------------------------------------------------------------
    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def gamma_mean(self) -> float:
        return sum(self.gammas) / len(self.gammas) if self.gammas else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated / (self.total_ms / 1000.0) if self.total_ms > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float:
        verified = self.generated - self.local_tokens
        return verified / self.target_forwards if self.target_forwards else 0.0

    # -- events -----------------------------------------------------------------------------------
    def on_drafter(self, device: str, backend: str, precision: str = "", precision_reason: str = "") -> None:
        """The answer drafts on ``device`` with ``backend``, built at ``precision`` for ``precision_reason``."""
        self.device, self.backend = device, backend
        self.draft_precision, self.draft_precision_reason = precision, precision_reason

    def on_request_started(self, cached_tokens: int) -> None:
        self.cached_prompt_tokens = cached_tokens

    def on_committed(self, count: int, source: Source, now_ms: float, elapsed_s: float) -> None:
        """``count`` tokens from ``source`` joined the answer ``now_ms`` after it started, ``elapsed_s`` after
        the previous ones."""
        if self.generated == 0:
            self.ttft_ms = now_ms
        self.generated += count
        if source == "local":
            self.local_tokens += count
        elif source == "cloud":
            self.cloud_tokens += count
            self.cloud_s += elapsed_s
        else:
            self.speculative_tokens += count
            self.speculative_s += elapsed_s

    def on_round_verdict(self, drafted: int, accepted: int, verify_ms: float, network_ms: float | None,
                         context: int = 0) -> None:
        """A round of ``drafted`` drafts, the first ``context`` of them looked up in the conversation, came back
        with ``accepted`` of them; the verifier spent ``verify_ms`` (queue and forward) and the network
        ``network_ms`` (None: not timed, a round sent ahead)."""
        looked_up = min(context, drafted)
        self.proposed_by_source["context"] += looked_up
        self.accepted_by_source["context"] += min(accepted, looked_up)
        self.proposed_by_source["model"] += drafted - looked_up
        self.accepted_by_source["model"] += accepted - min(accepted, looked_up)
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.gammas.append(drafted)
        while len(self.drafted_by_position) < drafted:
            self.drafted_by_position.append(0)
            self.accepted_by_position.append(0)
        for i in range(drafted):
            self.drafted_by_position[i] += 1
            if i < accepted:
                self.accepted_by_position[i] += 1
        self.target_forwards += 1
        self.verify_ms += verify_ms
        if network_ms is not None:
            self.network_ms += network_ms

    def on_round_discarded(self) -> None:
        self.discarded_rounds += 1

    def on_round_sent_ahead(self) -> None:
        self.ahead_rounds += 1

    def on_drafting(self, ms: float, drafts: Sequence[DraftProposal] = ()) -> None:
        """The drafter worked ``ms`` for this answer (drafting ``drafts``, or reading tokens it did not draft)."""
        self.edge_ms += ms
        self.lookahead_fed += sum(d.guessed for d in drafts)
        self.looked_ahead_drafts += sum(d.looked_ahead for d in drafts)

    def on_stream_scored(self, sample: float, ms: float) -> None:
        """The drafter scored a streamed token (acceptance sample ``sample``), working ``ms``."""
        self.streamed_scored += 1
        self.streamed_acceptance += (sample - self.streamed_acceptance) / self.streamed_scored
        self.edge_ms += ms

    def on_tokens_streamed(self, count: int, forward_ms: float) -> None:
        """The verifier generated ``count`` tokens alone in ``forward_ms``."""
        self.target_forwards += count
        self.verify_ms += forward_ms

    def on_reconnect(self) -> None:
        self.reconnects += 1

    def on_mode_step(self, step: Step) -> None:
        """A mode policy's step: into the decision trace when it changes the mode or probes."""
        if self.mode_switches and self.mode_switches[-1]["to"] == step.mode != "probe":
            return

        def rate(value: float | None) -> float | None:
            return None if value is None else round(value, 2)

        self.mode_switches.append({"at_token": self.generated, "to": step.mode,
                                   "speculative_tok_s": rate(step.speculative_tok_s),
                                   "streaming_tok_s": rate(step.streaming_tok_s), "gamma": step.gamma,
                                   "why": step.why})

    def on_answer_end(self, mode: Mode, total_ms: float, bytes_sent: int = 0, bytes_received: int = 0) -> None:
        self.mode, self.total_ms = mode, total_ms
        self.bytes_sent, self.bytes_received = bytes_sent, bytes_received

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(acceptance_rate=self.acceptance_rate, gamma_mean=self.gamma_mean,
                    tokens_per_second=self.tokens_per_second, tokens_per_forward=self.tokens_per_forward)
        return data
