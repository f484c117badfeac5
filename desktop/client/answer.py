"""The answer's vocabulary, below every answer mode: settings, streamed pieces, the state of one answer
(:class:`Run`), the events every mode handles alike, and the finished :class:`Answer` with its stats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from specd.desktop.client.adaptive import GammaController, ModePolicy
from specd.desktop.client.answer_stats import AnswerStats, Source
from specd.desktop.client.detokenize import IncrementalDetokenizer
from specd.desktop.client.round_planner import SourceAcceptance
from specd.shared import messages as m
from specd.shared.config import Config
from specd.shared.protocol import (
    ClientEvent,
    ClientSession,
    RequestCancelled,
    RequestStarted,
    ServerFailed,
    TokensStreamed,
)
from specd.shared.sampling import SamplingParams

__all__ = ["Answer", "AnswerStats", "Piece", "PieceCallback", "Run", "Settings", "common_event", "take_streamed"]

@dataclass(frozen=True, slots=True)
class Settings:
    """How to generate one answer."""

    sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=0.95)  # noqa: RUF009 - frozen, shared safely
    max_new_tokens: int = 256
    seed: int | None = None
    gamma: int | None = None  # None: adaptive
    gamma_max: int = 16
    support_k: int = 32
    pipeline: bool = True
    stop: tuple[int, ...] = ()
    # Per round, speculate or let the verifier stream alone, whichever is faster (the product's default,
    # from the config; off here so that a test of the rounds themselves gets rounds only).
    mode_switching: bool = False
    # Also draft from the conversation itself (``[speculation] context_proposer``; off here for the same reason).
    context_proposer: bool = False

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        s, spec = cfg.sampling, cfg.speculation
        return cls(sampling=SamplingParams.of(s),
                   max_new_tokens=s.max_new_tokens, seed=None if s.seed < 0 else s.seed,
                   gamma=None if spec.gamma == "auto" else int(spec.gamma), gamma_max=spec.gamma_max,
                   support_k=spec.proposal_top_k, pipeline=spec.pipeline, mode_switching=spec.mode_switching,
                   context_proposer=spec.context_proposer)


@dataclass(frozen=True, slots=True)
class Piece:
    """Newly committed tokens and the text they complete, with where they came from:
    ``draft`` (drafted and accepted), ``target`` (the verifier's correction or bonus), ``local``
    (draft model alone while the verifier was unreachable), ``cloud`` (cloud-only generation)."""

    token_ids: list[int]
    text: str
    source: Source


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

    ``committed`` (prompt + answer) is the one committed sequence on the edge. While a request is open on
    the verifier it *is* the session's (:attr:`ClientSession.committed`, which the session extends as the
    answer loop receives verdicts and streamed tokens); between requests — answering locally while the
    verifier is unreachable, or before the first request — the answer holds it itself. :meth:`open_request`
    and :meth:`close_request` hand it over, so there is never a second copy to reconcile.
    """

    settings: Settings
    seed: int
    prompt_len: int
    detok: IncrementalDetokenizer
    controller: GammaController
    on_piece: PieceCallback | None
    modes: ModePolicy | None = None  # None: speculative rounds only
    context_acceptance: SourceAcceptance | None = None  # the lookup's acceptance so far (None: a fresh estimate)
    stats: AnswerStats = field(default_factory=AnswerStats)
    pieces: list[Piece] = field(default_factory=list)
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    finish_reason: str | None = None
    clock: Stopwatch = field(default_factory=Stopwatch)
    stop_ids: frozenset[int] = frozenset()  # end-of-sequence and stop ids: drafting past them is wasted
    last_commit_ms: float = 0.0
    held: list[int] = field(default_factory=list)  # the committed sequence while no request is open
    session: ClientSession | None = None  # the session whose open request holds the committed sequence

    @classmethod
    def begin(cls, prompt_ids: list[int], settings: Settings, seed: int, tokenizer: Any,
              on_piece: PieceCallback | None, *, controller: GammaController | None = None,
              modes: ModePolicy | None = None, context_acceptance: SourceAcceptance | None = None) -> Run:
        """``controller`` and ``context_acceptance`` carry estimates over from earlier answers (fresh ones
        when None)."""
        return cls(settings=settings, seed=seed, prompt_len=len(prompt_ids), held=list(prompt_ids),
                   context_acceptance=context_acceptance,
                   detok=IncrementalDetokenizer(tokenizer),
                   controller=controller or GammaController(settings.gamma_max, settings.gamma), on_piece=on_piece,
                   modes=modes if settings.mode_switching else None)

    @property
    def committed(self) -> list[int]:
        """Prompt and answer so far (read only: the session, or :meth:`emit` with no request open, extend it)."""
        return self.session.committed if self.session is not None else self.held

    def open_request(self, session: ClientSession, mode: str) -> bytes:
        """The ``start`` frame of a request continuing the committed sequence; the session holds it from now on."""
        frame = session.start(list(self.held), max_new_tokens=self.remaining, sampling=self.wire_sampling,
                              seed=self.seed, stop=list(self.settings.stop), mode=mode)
        self.session = session
        return frame

    def close_request(self) -> None:
        """The request ended or its connection was lost: the answer holds what was committed again (the
        session received only what the answer loop handled, so nothing is lost or repeated)."""
        if self.session is not None:
            self.held, self.session = list(self.session.committed), None

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
        """Show ``tokens`` as committed: the session's (a verdict, streamed tokens), or, with no request
        open (``local``), tokens the answer commits itself."""
        if not tokens:
            return
        if self.session is None:
            self.held.extend(tokens)
        now = self.clock.ms()
        elapsed_s, self.last_commit_ms = (now - self.last_commit_ms) / 1000.0, now
        self.stats.on_committed(len(tokens), source, now, elapsed_s)
        self._piece(Piece(token_ids=list(tokens), text=self.detok.push(list(tokens)), source=source))

    def answer(self) -> Answer:
        """The finished answer: the detokenizer's held-back text comes out as a last piece."""
        tail = self.detok.flush()
        if tail:
            self._piece(Piece(token_ids=[], text=tail, source=self.pieces[-1].source if self.pieces else "target"))
        committed = self.committed
        return Answer(text=self.detok.text, prompt_token_ids=committed[: self.prompt_len],
                      token_ids=committed[self.prompt_len:], finish_reason=self.finish_reason,
                      stats=self.stats, pieces=self.pieces)

    def _piece(self, piece: Piece) -> None:
        self.pieces.append(piece)
        if self.on_piece is not None:
            self.on_piece(piece)


def take_streamed(run: Run, event: TokensStreamed) -> bool:
    """Commit tokens the verifier generated alone (cloud-only, or a stream within speculation); True when
    they end the answer."""
    tokens = event.tokens
    run.stats.on_tokens_streamed(len(tokens.tokens), tokens.forward_ms)
    run.emit(list(tokens.tokens), "cloud")
    if tokens.finished:
        run.finish_reason = tokens.reason
    return tokens.finished


def common_event(run: Run, event: ClientEvent) -> bool:
    """Handle the events every kind of answer treats alike; True when the request is over."""
    if isinstance(event, RequestStarted):
        run.stats.on_request_started(event.started.cached_tokens)
        return False
    if isinstance(event, RequestCancelled):
        run.finish_reason = "cancelled"
        return True
    if isinstance(event, ServerFailed):
        raise event.error
    return False
