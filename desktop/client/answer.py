"""The answer's vocabulary, below every answer mode: settings, streamed pieces, the state of one answer
(:class:`Run`), the events every mode handles alike, and the finished :class:`Answer` with its stats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from specd.desktop.client.adaptive import GammaController, ModePolicy, Step
from specd.desktop.client.detokenize import IncrementalDetokenizer
from specd.shared import messages as m
from specd.shared.config import Config
from specd.shared.protocol import ClientEvent, RequestCancelled, RequestStarted, ServerFailed, TokensStreamed
from specd.shared.sampling import SamplingParams

Source = Literal["draft", "target", "local", "cloud"]
Mode = Literal["speculative", "local", "cloud-only", "edge-only"]


@dataclass(frozen=True, slots=True)
class Settings:
    """How to generate one answer."""

    sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=0.95)  # noqa: RUF009 - frozen, shared safely
    max_new_tokens: int = 256
    seed: int | None = None
    gamma: int | None = None  # None: adaptive
    gamma_max: int = 8
    support_k: int = 32
    pipeline: bool = True
    stop: tuple[int, ...] = ()
    # Per round, speculate or let the verifier stream alone, whichever is faster (the product's default,
    # from the config; off here so that a test of the rounds themselves gets rounds only).
    mode_switching: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        s, spec = cfg.sampling, cfg.speculation
        return cls(sampling=SamplingParams.of(s),
                   max_new_tokens=s.max_new_tokens, seed=None if s.seed < 0 else s.seed,
                   gamma=None if spec.gamma == "auto" else int(spec.gamma), gamma_max=spec.gamma_max,
                   support_k=spec.proposal_top_k, pipeline=spec.pipeline, mode_switching=spec.mode_switching)


@dataclass(frozen=True, slots=True)
class Piece:
    """Newly committed tokens and the text they complete, with where they came from:
    ``draft`` (drafted and accepted), ``target`` (the verifier's correction or bonus), ``local``
    (draft model alone while the verifier was unreachable), ``cloud`` (cloud-only generation)."""

    token_ids: list[int]
    text: str
    source: Source


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
    # The mode chooser's decision trace: the answer's first step, every change between rounds and
    # streaming, and every probe, each with the two rates (tok/s) that decided it.
    mode_switches: list[dict[str, Any]] = field(default_factory=list)

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

    def record_round(self, drafted: int, accepted: int) -> None:
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

    def record_step(self, step: Step) -> None:
        """Add a mode policy's step to the decision trace when it changes the mode or probes."""
        if self.mode_switches and self.mode_switches[-1]["to"] == step.mode != "probe":
            return

        def rate(value: float | None) -> float | None:
            return None if value is None else round(value, 2)

        self.mode_switches.append({"at_token": self.generated, "to": step.mode,
                                   "speculative_tok_s": rate(step.speculative_tok_s),
                                   "streaming_tok_s": rate(step.streaming_tok_s), "gamma": step.gamma,
                                   "why": step.why})

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(acceptance_rate=self.acceptance_rate, gamma_mean=self.gamma_mean,
                    tokens_per_second=self.tokens_per_second, tokens_per_forward=self.tokens_per_forward)
        return data


@dataclass(slots=True)
class Answer:
    text: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    stats: AnswerStats
    pieces: list[Piece] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"text": self.text, "prompt_token_ids": self.prompt_token_ids, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "stats": self.stats.to_json(),
                "segments": _segments(self.pieces)}


def _segments(pieces: list[Piece]) -> list[dict]:
    """Consecutive pieces of the same provenance class (verified / local / cloud) merged."""
    merged: list[dict] = []
    for piece in pieces:
        kind = "verified" if piece.source in ("draft", "target") else piece.source
        if merged and merged[-1]["source"] == kind:
            merged[-1]["text"] += piece.text
            merged[-1]["tokens"] += len(piece.token_ids)
        else:
            merged.append({"source": kind, "text": piece.text, "tokens": len(piece.token_ids)})
    return merged


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000.0


PieceCallback = Callable[[Piece], Any]


@dataclass(slots=True)
class Run:
    """The state of one answer, shared by the speculative, cloud-only and local modes.

    ``committed`` (prompt + answer) is the one committed sequence on the edge; every mode extends it
    through :meth:`emit` only.
    """

    settings: Settings
    seed: int
    prompt_len: int
    committed: list[int]
    detok: IncrementalDetokenizer
    controller: GammaController
    on_piece: PieceCallback | None
    modes: ModePolicy | None = None  # None: speculative rounds only
    stats: AnswerStats = field(default_factory=AnswerStats)
    pieces: list[Piece] = field(default_factory=list)
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    finish_reason: str | None = None
    clock: Stopwatch = field(default_factory=Stopwatch)
    stop_ids: frozenset[int] = frozenset()  # end-of-sequence and stop ids: drafting past them is wasted
    last_commit_ms: float = 0.0

    @classmethod
    def begin(cls, prompt_ids: list[int], settings: Settings, seed: int, tokenizer: Any,
              on_piece: PieceCallback | None, *, controller: GammaController | None = None,
              modes: ModePolicy | None = None) -> Run:
        """``controller`` carries estimates over from earlier answers (a fresh one when None)."""
        return cls(settings=settings, seed=seed, prompt_len=len(prompt_ids), committed=list(prompt_ids),
                   detok=IncrementalDetokenizer(tokenizer),
                   controller=controller or GammaController(settings.gamma_max, settings.gamma), on_piece=on_piece,
                   modes=modes if settings.mode_switching else None)

    @property
    def remaining(self) -> int:
        return self.settings.max_new_tokens - (len(self.committed) - self.prompt_len)

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    @property
    def wire_sampling(self) -> m.Sampling:
        s = self.settings.sampling
        return m.Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)

    def emit(self, tokens: list[int], source: Source) -> None:
        if not tokens:
            return
        now, stats = self.clock.ms(), self.stats
        if stats.generated == 0:
            stats.ttft_ms = now
        elapsed_s, self.last_commit_ms = (now - self.last_commit_ms) / 1000.0, now
        self.committed.extend(tokens)
        stats.generated += len(tokens)
        if source == "local":
            stats.local_tokens += len(tokens)
        elif source == "cloud":
            stats.cloud_tokens += len(tokens)
            stats.cloud_s += elapsed_s
        else:
            stats.speculative_tokens += len(tokens)
            stats.speculative_s += elapsed_s
        self._piece(Piece(token_ids=list(tokens), text=self.detok.push(list(tokens)), source=source))

    def answer(self) -> Answer:
        """The finished answer: the detokenizer's held-back text comes out as a last piece."""
        tail = self.detok.flush()
        if tail:
            self._piece(Piece(token_ids=[], text=tail, source=self.pieces[-1].source if self.pieces else "target"))
        return Answer(text=self.detok.text, prompt_token_ids=self.committed[: self.prompt_len],
                      token_ids=self.committed[self.prompt_len:], finish_reason=self.finish_reason,
                      stats=self.stats, pieces=self.pieces)

    def _piece(self, piece: Piece) -> None:
        self.pieces.append(piece)
        if self.on_piece is not None:
            self.on_piece(piece)


def take_streamed(run: Run, event: TokensStreamed) -> bool:
    """Commit tokens the verifier generated alone (cloud-only, or a stream within speculation); True when
    they end the answer."""
    tokens = event.tokens
    run.stats.target_forwards += len(tokens.tokens)
    run.stats.verify_ms += tokens.forward_ms
    run.emit(list(tokens.tokens), "cloud")
    if tokens.finished:
        run.finish_reason = tokens.reason
    return tokens.finished


def common_event(run: Run, event: ClientEvent) -> bool:
    """Handle the events every kind of answer treats alike; True when the request is over."""
    if isinstance(event, RequestStarted):
        run.stats.cached_prompt_tokens = event.started.cached_tokens
        return False
    if isinstance(event, RequestCancelled):
        run.finish_reason = "cancelled"
        return True
    if isinstance(event, ServerFailed):
        raise event.error
    return False
