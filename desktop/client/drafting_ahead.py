"""Drafting the next round in the drafter thread while the current one is verified.

The round drafted ahead assumes every draft in flight is accepted and the bonus token is the draft's own
best guess; it is proposed after ``committed + drafts in flight + [guess]`` and stays useful only while the
committed sequence becomes exactly that prefix (the verifier discards it otherwise). Drafts are keyed by
position and seed, so drafting ahead changes when tokens come, never which. When the context lookup
continues the drafts in flight with the same guess (or its guesses come true more often than the
drafter's), the round takes the lookup's guess and starts with what it looked up, at no drafting cost; the
model drafts after it as the planner's split says, with what the lookup finds after them as its guess
(lookahead.py).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

from specd.desktop.client.answer import Run
from specd.desktop.client.link import Link
from specd.desktop.client.lookahead import LookupGuesses
from specd.desktop.client.round_planner import AheadPlan, RoundPlan
from specd.desktop.client.rounds import SentRound, merge, with_lookup
from specd.desktop.drafters.base import DraftProposal
from specd.shared.protocol import ClientState


class DraftingAhead:
    """One round being drafted ahead of ``current``'s verdict (:meth:`start`), then sent or dropped."""

    def __init__(self, gamma: int, base: list[int], looked_up: AheadPlan | None = None) -> None:
        self.gamma = gamma
        self.base = base  # the current round's prefix and drafts; the guess comes after them
        self.looked_up = looked_up  # the lookup's guess and round, used if the drafter's guess is the same
        self.plan = RoundPlan((), gamma)  # the round drafted, once the guess is made
        self.abort = threading.Event()
        self.guess: asyncio.Future = asyncio.get_running_loop().create_future()
        self.task: asyncio.Future | None = None

    @classmethod
    def start(cls, link: Link, run: Run, current: SentRound, room: int,
              looked_up: AheadPlan | None = None, guesses: LookupGuesses | None = None) -> DraftingAhead:
        base = [*current.prefix, *current.tokens]
        job = cls(max(1, min(run.controller.choose(room), link.max_gamma(len(base) + 1))), base, looked_up)
        loop = asyncio.get_running_loop()
        drafter, settings, seed, stop = link.drafter, run.settings, run.seed, run.stop_ids

        def work() -> tuple[list[DraftProposal], float]:
            drafter.prefill(base)
            guess = drafter.most_likely_next()
            lookup = job.looked_up
            if lookup is not None and (lookup.guess == guess or lookup.trusted):
                guess, job.plan = lookup.guess, lookup.plan
            else:
                job.plan = RoundPlan((), job.gamma)
            loop.call_soon_threadsafe(job.guess.set_result, guess)
            start = time.perf_counter()
            sequence = [*base, guess, *job.plan.lookup]
            pieces: list[DraftProposal] = []
            drawn: list[int] = []  # the round's model drafts so far
            round_guess = None if guesses is None else guesses.for_round(
                current.prefix, [*current.tokens, guess, *job.plan.lookup], job.plan.model_gamma)

            def piece_guess(drafts: Sequence[int]) -> list[int]:
                return round_guess([*drawn, *drafts]) if round_guess is not None else []

            for _ in range(job.plan.model_gamma):  # one at a time, so an abort stops it between tokens
                if job.abort.is_set() or sequence[-1] in stop:
                    break
                pieces.append(drafter.propose(sequence, 1, settings.sampling, settings.support_k, seed, stop,
                                              piece_guess if round_guess is not None else None))
                drawn.extend(pieces[-1].tokens)
                sequence += pieces[-1].tokens
            return pieces, (time.perf_counter() - start) * 1000.0

        job.task = asyncio.ensure_future(link.in_drafter(work))
        return job

    async def prefix(self) -> list[int]:
        """The committed sequence this round assumes: ``base`` and the guessed target token."""
        return [*self.base, await self.guess]

    def guessed(self, token: int) -> bool | None:
        """Whether the guess was ``token`` (None while the guess is not made yet)."""
        return self.guess.result() == token if self.guess.done() else None

    async def finish(self, link: Link, run: Run) -> SentRound | None:
        """The round is drafted: send it; the verifier verifies it only if what it assumed came true."""
        pieces, draft_ms = await self._collect(run)
        plan = self.plan
        if (not pieces and not plan.lookup) or link.session.state is not ClientState.ACTIVE:
            return None
        proposal = with_lookup(plan.lookup, merge(pieces) if pieces else None, run.settings.sampling.greedy)
        prefix = await self.prefix()
        # The session frames the round after *its* committed tokens, which end before the round in flight:
        # the round assumes what comes after them (that round's drafts and the guess).
        known = link.session.committed
        if known != prefix[: len(known)]:
            return None  # a verdict already ruled this round out
        number, frame = link.session.draft(proposal.tokens, proposal.wire(), assumed=prefix[len(known):])
        await link.send(frame)
        run.stats.on_round_sent_ahead()
        if pieces:
            run.controller.observe_draft_time(draft_ms / sum(len(piece.tokens) for piece in pieces))
        return SentRound(number=number, prefix=prefix, tokens=proposal.tokens, draft_ms=draft_ms, ahead=True,
                         sent_at=time.perf_counter(), context=len(plan.lookup), matched=plan.matched,
                         found=plan.found)

    async def drop(self, run: Run) -> None:
        """Stop drafting (between tokens) and forget the round."""
        self.abort.set()
        await self._collect(run)

    async def _collect(self, run: Run) -> tuple[list[DraftProposal], float]:
        assert self.task is not None
        pieces, draft_ms = await self.task
        run.stats.on_drafting(draft_ms, pieces)
        return pieces, draft_ms
