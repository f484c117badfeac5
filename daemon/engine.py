"""The batched engine: one target forward serves every session that has work ready.

Sessions submit *jobs*: make the KV hold a prefix, then run ``query`` tokens and hand their logits to
a ``finish`` function (a round's verdict, a cloud step's sample). The scheduler, an asyncio task,
repeatedly picks the work of one forward and runs it on the one model thread:

- *Rounds* (jobs whose remaining tokens are just their query: draft rounds, cloud steps) from every
  session with one ready go into one forward, oldest first, under ``max_batch_tokens``. With the
  goodput budget on (``[limits] goodput_budget``), the forward verifies a prefix of each round's drafts,
  as many as maximise expected tokens per second of the forward (daemon/goodput.py): the width of
  the forward is chosen from each session's measured acceptance and the engine's own measured
  forward cost, and a round runs as if it had drafted only that many.
- *Prefill* (a prompt, or positions a session must recompute) is cut into chunks so a forward stays
  under ``max_batch_tokens``; a prefill forward and a rounds forward alternate, so a long prompt
  delays the others' rounds by one chunk at most.
- A session has one job at a time (its driver awaits each), so it never waits behind another
  session's second round. A job whose caller went away (cancelled future, closed session) is dropped
  before the next forward.

The engine knows nothing of websockets: the daemon's session driver and a capacity benchmark drive it
alike. Each session's KV lives in a backend (kv_backends.py): preallocated slots for the model types
:func:`~specd.daemon.kv_slots.batched_support` accepts, else transformers' ``DynamicCache`` with one
session per forward (logged once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from specd.daemon.goodput import (
    EXPLORE_BURST,
    EXPLORE_SHARE,
    Acceptance,
    Choice,
    ForwardCost,
    Offer,
    choose,
    suggested_gamma,
)
from specd.daemon.kv_backends import KVBackend, SessionBackend, SlotBackend
from specd.daemon.kv_slots import BatchRow, KVShape, batched_support, slot_count
from specd.daemon.target import TargetModel
from specd.shared.errors import ConfigError
from specd.shared.protocol.codec import common_prefix

log = logging.getLogger("specd.daemon.engine")

Finish = Callable[[torch.Tensor], Any]  # float32 logits [len(query), V] -> the job's result
IDLE_FORGETTING = 0.1  # weight of the latest wait for work in the engine's mean idle time
MAX_IDLE_SAMPLE_S = 1.0


class EngineFull(Exception):
    """Every KV slot is taken: the caller refuses the session (``too_many_sessions``)."""


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_sessions: int
    slot_len: int  # positions a session can hold: the effective max_total_tokens
    max_batch_tokens: int = 512
    kv_cache_gib: float = 0.0  # 0: max_sessions x slot_len positions
    one_session_per_forward: bool = False  # for comparisons; batched otherwise where the model allows
    goodput_budget: bool = True  # verify the prefix of each round's drafts that maximises goodput
    max_draft: int = 16  # the most drafts a round may carry: the ceiling of the suggested γ


@dataclass(eq=False, slots=True)
class EngineSession:
    """One session's place in the engine: its slot and the tokens its KV holds, position for position."""

    slot: int
    tokens: list[int] = field(default_factory=list)
    closed: bool = False
    acceptance: Acceptance = field(default_factory=Acceptance)  # the driver reports each verdict here
    suggested_gamma: int = 0  # set with each round the budget chose for: γ worth drafting next (0: none)


@dataclass(eq=False, slots=True)
class _Job:
    session: EngineSession
    pending: list[int]  # tokens still to run, the query last
    query: int  # how many of the last pending tokens need logits
    finish: Finish | None
    future: asyncio.Future
    queued: float
    started: float = 0.0
    drafts: int = 0  # the query's last ``drafts`` tokens are drafts the budget may leave unverified

    def trim(self, verified: int) -> None:
        """Verify only the first ``verified`` drafts: the rest leave the query (a round is never split)."""
        cut = self.drafts - verified
        if cut > 0:
            del self.pending[len(self.pending) - cut:]
            self.query -= cut
            self.drafts = verified

    @property
    def is_round(self) -> bool:
        return len(self.pending) <= self.query

    def chunk(self, width: int) -> int:
        """How many pending tokens fit ``width``; the query is never split across forwards."""
        size = min(len(self.pending), width)
        if size < len(self.pending) and size > len(self.pending) - self.query:
            size = len(self.pending) - self.query or len(self.pending)
        return size


@dataclass(frozen=True, slots=True)
class ForwardStats:
    sessions: int
    tokens: int
    seconds: float
    width: int = 0  # positions per row (rows are padded to the widest)
    trimmed: int = 0  # drafts the budget left unverified in this forward


class Engine:
    """Batched verification over one :class:`TargetModel`; create with :meth:`create` on any thread."""

    def __init__(self, target: TargetModel, backend: KVBackend, limits: EngineLimits,
                 executor: ThreadPoolExecutor, cost: ForwardCost | None = None,
                 population: Acceptance | None = None) -> None:
        self.target, self.backend, self.limits = target, backend, limits
        self.cost = cost or ForwardCost()
        # every session's rounds: the prior of each session's own
        self.acceptance = population if population is not None else Acceptance.pooled()
        self.batched = isinstance(backend, SlotBackend) and backend.max_rows > 1
        self.on_forward: Callable[[ForwardStats], None] | None = None
        self._executor = executor
        self._free = list(range(backend.capacity))
        self._jobs: list[_Job] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_was_prefill = False
        self._trimmed = 0
        self._idle_s = 0.0  # discounted mean time the engine waited for work between forwards
        self._explore_credit = 0.0  # predicted forward seconds exploring starved sessions may still spend
        self.busy = False

    @classmethod
    def create(cls, target: TargetModel, limits: EngineLimits, executor: ThreadPoolExecutor,
               cost: ForwardCost | None = None, population: Acceptance | None = None) -> Engine:
        """Size the KV memory (logged), pick the batched or the one-session backend (logged); with the
        goodput budget on, time a few forwards to seed the cost model (unless ``cost`` is calibrated).
        ``cost`` and ``population`` (the pooled acceptance of every session's rounds) carry over what an
        earlier engine of the same process measured."""
        if limits.max_batch_tokens < 1:
            raise ConfigError("[limits] max_batch_tokens must be at least 1")
        reason = batched_support(target.model)
        if reason is None:
            shape = KVShape.of(target.model, target.dtype)
            slots = slot_count(shape, slot_len=limits.slot_len, max_sessions=limits.max_sessions,
                               kv_cache_gib=limits.kv_cache_gib, device=target.device)
            if slots < 1:
                raise ConfigError(f"[limits] kv_cache_gib = {limits.kv_cache_gib:g} holds no session of "
                                  f"max_total_tokens = {limits.slot_len} ({shape.bytes_per_token} bytes per "
                                  "position); raise it or lower max_total_tokens")
            rows = 1 if limits.one_session_per_forward else slots
            if limits.one_session_per_forward:
                log.info("batching off: one session per forward (one_session_per_forward)")
            backend: KVBackend = SlotBackend(target.model, dtype=target.dtype, device=target.device, slots=slots,
                                             slot_len=limits.slot_len, max_rows=rows)
        else:
            log.warning("batching off for %s: %s; one session per forward", target.name, reason)
            backend = SessionBackend(target.model, capacity=limits.max_sessions)
        engine = cls(target, backend, limits, executor, cost, population)
        if limits.goodput_budget and not engine.cost.calibrated:
            engine.calibrate()
        return engine

    def calibrate(self) -> None:
        """On the model thread, before any session: time forwards of a few shapes on free slots (two
        passes over the shapes, the fastest of each: a burst of load elsewhere hits one pass, not one
        shape) and fit the forward cost model to them."""
        most = max(1, min(self.backend.max_rows, len(self._free)))
        widest = max(1, min(9, self.limits.slot_len, self.limits.max_draft + 1))
        room = max(self.limits.max_batch_tokens, widest)
        rows_timed = sorted({min(most, 4 ** i) for i in range(8) if 4 ** i < most * 4})
        shapes = [(rows, width) for rows in rows_timed
                  for width in sorted({1, min(3, widest), min(widest, room // rows)}) if width >= 1]
        fastest = dict.fromkeys(shapes, float("inf"))
        for _pass in range(2):
            for rows, width in shapes:
                slots = self._free[:rows]
                batch = [BatchRow(slot=slot, start=0, ids=[0] * width) for slot in slots]
                began = time.perf_counter()
                self.backend.forward(batch, [1] * rows)
                fastest[rows, width] = min(fastest[rows, width], time.perf_counter() - began)
                for slot in slots:
                    self.backend.truncate(slot, 0)
        samples = [(rows, width, seconds) for (rows, width), seconds in fastest.items()]
        self.cost.calibrate(samples)
        log.info("forward cost on %s (%d shapes timed): %s", self.target.device, len(samples), self.cost.describe())

    # -- sessions ---------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.backend.capacity

    @property
    def open_sessions(self) -> int:
        return self.backend.capacity - len(self._free)

    def decode_step_ms(self) -> float:
        """One decode step of a session that joins now, in ms: the cost model's forward of one position
        for it and every session with work queued or running (0 before the model was calibrated)."""
        if not self.cost.calibrated:
            return 0.0
        rows = 1 + len({job.session.slot for job in self._jobs}) if self.batched else 1
        return 1000.0 * self.cost.seconds(min(rows, max(1, self.backend.max_rows)), 1)

    @property
    def pending(self) -> int:
        return len(self._jobs)

    def open(self) -> EngineSession:
        if not self._free:
            raise EngineFull(f"all {self.capacity} KV slots are in use")
        return EngineSession(slot=self._free.pop(0), acceptance=Acceptance(population=self.acceptance))

    def close(self, session: EngineSession) -> None:
        """Free the session's slot; a job of it still queued is dropped before the next forward."""
        if session.closed:
            return
        session.closed = True
        self.backend.release(session.slot)
        self._free.append(session.slot)
        self._free.sort()  # low slots first, so the busy ones stay a contiguous run

    def reset(self, session: EngineSession) -> None:
        """Forget what the session's KV holds (after a failed forward its content is unknown)."""
        session.tokens = []
        self.backend.truncate(session.slot, 0)

    # -- jobs -------------------------------------------------------------------------------------
    async def prefill(self, session: EngineSession, tokens: list[int], reusable: int) -> int:
        """Hold ``tokens[:-1]``, reusing at most ``reusable`` positions; returns how many were reused."""
        prefix = tokens[:-1]
        self._truncate(session, min(reusable, common_prefix(session.tokens, prefix)))
        kept = len(session.tokens)
        await self.run(session, prefix, [], None)
        return kept

    async def run(self, session: EngineSession, prefix: list[int], query: list[int],
                  finish: Finish | None, *, drafts: int = 0) -> tuple[Any, float, float]:
        """Hold ``prefix``, run ``query`` and return ``(finish(logits), queue_s, run_s)``.

        Positions the KV already holds are kept (the common part with ``prefix``); whatever the KV
        holds beyond it, such as last round's rejected drafts, is rolled back first. The last ``drafts``
        tokens of ``query`` are drafts the goodput budget may leave out: ``finish`` then gets the logits
        of the shorter query (one row per token run).
        """
        if session.closed:
            raise RuntimeError("the session is closed")
        if len(prefix) + len(query) > self.limits.slot_len:  # the protocol's limits keep this from happening
            raise ValueError(f"{len(prefix) + len(query)} positions exceed the session's KV slot of "
                             f"{self.limits.slot_len} (max_total_tokens)")
        self._truncate(session, common_prefix(session.tokens, prefix))
        pending = prefix[len(session.tokens):] + list(query)
        loop = asyncio.get_running_loop()
        job = _Job(session=session, pending=pending, query=len(query), finish=finish,
                   future=loop.create_future(), queued=time.monotonic(), drafts=max(0, min(drafts, len(query) - 1)))
        if not pending:
            job.future.set_result((None, 0.0, 0.0))
        else:
            self._ensure_started()
            self._jobs.append(job)
            self._wake.set()
        return await job.future

    def _truncate(self, session: EngineSession, length: int) -> None:
        if len(session.tokens) > length:
            del session.tokens[length:]
            self.backend.truncate(session.slot, length)

    # -- scheduling -------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._schedule(), name="specd-engine")

    def _next_batch(self) -> list[tuple[_Job, int]]:
        """The jobs of the next forward and how many tokens each runs in it."""
        self._jobs = [j for j in self._jobs if not j.future.done() and not j.session.closed]
        rounds = [j for j in self._jobs if j.is_round]
        prefills = [j for j in self._jobs if not j.is_round]
        use_prefill = bool(prefills) and (not rounds or not self._last_was_prefill)
        group = prefills if use_prefill else rounds
        self._last_was_prefill = use_prefill
        if rounds and not use_prefill and self.limits.goodput_budget:
            return self._budgeted(rounds)
        budget, batch = self.limits.max_batch_tokens, []
        for job in group[: self.backend.max_rows]:
            width = max(1, budget // (len(batch) + 1)) if use_prefill else budget
            trial = [(j, j.chunk(width)) for j, _ in batch] + [(job, job.chunk(width))]
            if batch and len(trial) * max(size for _, size in trial) > budget:
                break
            batch = trial
        return batch

    def _budgeted(self, rounds: list[_Job]) -> list[tuple[_Job, int]]:
        """The rounds forward under the goodput budget: the width, the rows it leaves room for, each
        round trimmed to it, and each session's suggested γ."""
        ceiling = max(self.limits.max_draft, max(j.drafts for j in rounds))
        offers = [Offer(drafts=j.drafts, h=j.session.acceptance.conditional(ceiling)) for j in rounds]
        sizes = dict(max_rows=self.backend.max_rows, max_positions=self.limits.max_batch_tokens, idle_s=self._idle_s)
        choice = choose(offers, self.cost, **sizes)
        credit = self._explore_credit + EXPLORE_SHARE * self.cost.seconds(choice.rows, choice.width)
        if choice.width == 1 and any(j.drafts and j.session.acceptance.starved for j in rounds[:choice.rows]):
            # Measure acceptance again: the whole forward at width 2, as its share of time allows.
            rows = max(1, min(choice.rows, self.limits.max_batch_tokens // 2))  # width 2 takes twice the positions
            extra = self.cost.seconds(rows, 2) - self.cost.seconds(rows, 1)
            credit = min(credit, EXPLORE_BURST * extra)
            if credit >= extra:
                credit -= extra
                choice = Choice(width=2, rows=rows, goodput=choice.goodput)
        self._explore_credit = credit
        hint = suggested_gamma(offers[:choice.rows], self.cost, ceiling=self.limits.max_draft, **sizes)
        batch = []
        for job, offer in zip(rounds[:choice.rows], offers, strict=False):
            if job.drafts:
                self._trimmed += job.drafts - choice.verified(offer)
                job.trim(choice.verified(offer))
                job.session.suggested_gamma = hint
            batch.append((job, len(job.pending)))
        return batch

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        last_done = time.monotonic()
        while True:
            batch = self._next_batch()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.monotonic()
            waited = min(started - last_done, MAX_IDLE_SAMPLE_S)  # a quiet hour is not a client's drafting time
            self._idle_s += IDLE_FORGETTING * (waited - self._idle_s)
            for job, _size in batch:
                job.started = job.started or started
            self.busy = True
            try:
                outcomes = await loop.run_in_executor(self._executor, self._forward, batch)
            finally:
                self.busy = False
            done = last_done = time.monotonic()
            width = max(size for _, size in batch)
            self.cost.observe(len(batch) if self.batched else 1, width, done - started)
            for (job, _size), outcome in zip(batch, outcomes, strict=True):
                if job.pending and not isinstance(outcome, BaseException):
                    continue  # more chunks to go
                if job in self._jobs:
                    self._jobs.remove(job)
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result((outcome, job.started - job.queued, done - job.started))
            trimmed, self._trimmed = self._trimmed, 0
            if self.on_forward is not None:
                self.on_forward(ForwardStats(sessions=len(batch), tokens=sum(s for _, s in batch),
                                             seconds=done - started, width=width, trimmed=trimmed))

    def _forward(self, batch: list[tuple[_Job, int]]) -> list[Any]:
        """On the model thread: one forward over the batch, then each finished job's ``finish``."""
        rows = [BatchRow(slot=job.session.slot, start=len(job.session.tokens), ids=job.pending[:size])
                for job, size in batch]
        wanted = [job.query if size == len(job.pending) else 0 for job, size in batch]
        try:
            logits = self.backend.forward(rows, wanted)
        except Exception as exc:  # every job of the batch fails; their KV content is unknown now
            for job, _size in batch:
                self.reset(job.session)
                job.pending = []
            return [exc] * len(batch)
        self.target.record_forward(sum(len(row.ids) for row in rows))
        outcomes: list[Any] = []
        for (job, size), row, row_logits in zip(batch, rows, logits, strict=True):
            job.session.tokens.extend(row.ids)
            job.pending = job.pending[size:]
            if job.pending or job.finish is None:
                outcomes.append(None)
                continue
            try:
                assert row_logits is not None
                outcomes.append(job.finish(row_logits))
            except Exception as exc:  # handed to the session that asked; the others go on
                outcomes.append(exc)
        return outcomes

    async def close_all(self) -> None:
        """Stop scheduling and fail what is still queued (the server is stopping)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for job in self._jobs:
            job.future.cancel()
        self._jobs.clear()
