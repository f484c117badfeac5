"""One answer's speculative rounds: draft → verdict, optionally drafting ahead, and (with a mode policy,
``Run.modes``) stretches the verifier generates alone, asked for with ``stream`` in the same request.

``Run.committed`` is the one committed sequence. Each round is drafted with
``drafter.propose(prefix, γ, …)``, and the drafter reconciles its own cache with ``prefix`` (longest
common prefix), so nothing here mirrors or resyncs it. A round drafted ahead is proposed after
``committed + drafts in flight + [guess]``; it stays useful only while the committed sequence becomes
exactly that prefix. Drafts are keyed by position and seed, so the output does not depend on whether
rounds were drafted ahead — only the time does.

Switching keeps the request, so the verifier keeps its KV cache and each position is produced once: by
a round or by a streamed step, chosen from what was measured so far (docs/protocol.md §5).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import torch

from specd.desktop.client.adaptive import ModePolicy, Step
from specd.desktop.client.answer import Run, common_event, take_streamed
from specd.desktop.client.link import Link
from specd.desktop.drafters.base import DraftProposal
from specd.shared.protocol import ClientState, RoundDiscarded, RoundVerdict, TokensStreamed
from specd.shared.sampling import ProposalDistribution


@dataclass(slots=True)
class _Round:
    number: int
    prefix: list[int]  # the committed sequence this round's drafts continue
    tokens: list[int]
    draft_ms: float
    ahead: bool
    sent_at: float = 0.0


@dataclass(slots=True)
class _Streaming:
    """The stretch the verifier is generating alone: tokens asked for and not yet handled here."""

    owed: int = 0
    steady: bool = False  # the last tokens arrived with more still owed: the next gap is one decode step
    last_at: float = 0.0
    since_round: bool = False  # tokens were streamed since the last round: the drafter has not read them


_ROUND = Step(round=True)


@dataclass(slots=True)
class _AheadJob:
    """Drafting the next round in the drafter thread while the current one is verified."""

    gamma: int
    base: list[int]  # the current round's prefix and drafts; the guess comes after them
    abort: threading.Event = field(default_factory=threading.Event)
    guess: asyncio.Future | None = None
    task: asyncio.Future | None = None

    async def prefix(self) -> list[int]:
        """The committed sequence this round assumes: ``base`` and the guessed target token."""
        return [*self.base, await self.guess]


async def speculate(link: Link, run: Run) -> None:
    """Run rounds until the request finishes or is cancelled; connection loss raises out of here."""
    session, settings = link.session, run.settings
    run.stop_ids = link.eos_ids() | frozenset(settings.stop)
    modes = run.modes if session.can_stream else None  # a verifier that does not announce it: rounds only
    await link.send(session.start(list(run.committed), max_new_tokens=run.remaining, sampling=run.wire_sampling,
                                    seed=run.seed, stop=list(settings.stop), mode="speculative"))
    streaming = _Streaming()
    step = modes.next_step(run.remaining) if modes is not None else _ROUND
    if step.round:
        await link.in_drafter(lambda: link.drafter.prefill(run.committed))  # while the verifier prefills
    in_flight: list[_Round] = []
    ahead: _AheadJob | None = None
    cancel_sent = False
    try:
        while True:
            if run.cancelled and not cancel_sent:
                await link.send(session.cancel())
                cancel_sent = True
            active = session.state is ClientState.ACTIVE  # the reader may have seen the request end
            if (active and not cancel_sent and not in_flight and ahead is None and not streaming.owed
                    and len(session.committed) == len(run.committed)):  # nothing waits in the inbox
                if step is None:
                    step = modes.next_step(run.remaining) if modes is not None else _ROUND
                if step.round:
                    if streaming.since_round:
                        await _catch_up(link, run)
                        streaming.since_round = False
                    sent = await _send_round(link, run)
                    if sent is not None:
                        in_flight.append(sent)
                if step.stream and session.state is ClientState.ACTIVE:
                    await _ask_stream(link, streaming, step.stream)
                step = None
            room = run.remaining - len(in_flight[0].tokens) - 1 if len(in_flight) == 1 else 0
            if (active and settings.pipeline and not cancel_sent and ahead is None and room >= 1
                    and not streaming.owed  # a stream follows the round: its tokens, not a guess, come next
                    and run.controller.worth_drafting_ahead(len(in_flight[0].tokens), run.controller.choose(room))):
                ahead = _start_ahead(link, run, in_flight[0], room)
            event = await link.next_event(ahead.task if ahead else None, run.cancel_event)
            if event is None:  # the ahead round is drafted, or the user asked to cancel
                if ahead is not None and ahead.task.done():
                    sent = await _finish_ahead(link, run, ahead)
                    ahead = None
                    if sent is not None:
                        in_flight.append(sent)
                continue
            if isinstance(event, RoundVerdict):
                current = in_flight.pop(0) if in_flight and in_flight[0].number == event.verdict.round else None
                _account(run, event, current)
                if (ahead is not None and ahead.guess.done() and current is not None
                        and event.verdict.accepted == event.drafted):
                    run.controller.observe_guess(ahead.guess.result() == event.verdict.token)
                run.emit(event.new_tokens[:-1], "draft")
                run.emit(event.new_tokens[-1:], "target")
                if event.finished:
                    run.finish_reason = event.verdict.reason
                    return
                if not await _next_round_still_fits(run, in_flight, ahead):
                    # Rounds already sent ahead come back as 'discarded'.
                    await _forget_rounds_ahead(run, in_flight, ahead)
                    ahead = None
            elif isinstance(event, TokensStreamed):
                if _streamed(run, event, streaming, modes):
                    return
                if modes is not None and not cancel_sent:
                    more = modes.top_up(run.remaining, streaming.owed)
                    if more > 0:
                        await _ask_stream(link, streaming, more)
            elif isinstance(event, RoundDiscarded):
                run.stats.discarded_rounds += 1
                if any(r.number == event.discarded.round for r in in_flight):
                    # The server did not build on what this round assumed, so neither can anything
                    # drafted after it: forget those drafts and draft again from the committed tokens.
                    await _forget_rounds_ahead(run, in_flight, ahead)
                    ahead = None
            elif common_event(run, event):
                return
    finally:
        if ahead is not None:
            await _drop_ahead(run, ahead)


async def _forget_rounds_ahead(run: Run, in_flight: list[_Round], ahead: _AheadJob | None) -> None:
    """Forget the rounds in flight and the one being drafted ahead (the next round is drafted from
    the committed tokens; the drafter reconciles its cache itself)."""
    if ahead is not None:
        await _drop_ahead(run, ahead)
    in_flight.clear()


async def _ask_stream(link: Link, streaming: _Streaming, tokens: int) -> None:
    tokens = min(tokens, link.session.welcome.limits.max_stream_tokens)
    await link.send(link.session.stream(tokens))
    streaming.owed += tokens


def _streamed(run: Run, event: TokensStreamed, streaming: _Streaming, modes: ModePolicy | None) -> bool:
    """Tokens the verifier generated alone; True when they end the answer."""
    now = time.perf_counter()
    count = len(event.tokens.tokens)
    gap_ms = (now - streaming.last_at) * 1000.0 if streaming.steady else None
    streaming.owed = max(0, streaming.owed - count)
    streaming.steady, streaming.last_at, streaming.since_round = streaming.owed > 0, now, True
    if modes is not None:
        modes.observe_stream(count, event.tokens.forward_ms, gap_ms)
    return take_streamed(run, event)


def _account(run: Run, event: RoundVerdict, current: _Round | None) -> None:
    verdict, stats = event.verdict, run.stats
    server_ms = verdict.queue_ms + verdict.forward_ms
    drafted, accepted = event.verified, verdict.accepted  # drafts the budget left unverified were not judged
    run.controller.observe_server_gamma(event.suggested_gamma)
    if verdict.finished and current is not None:
        # The request ended inside the round: drafts after the stop were never judged, and a draft that
        # was itself the stop token comes back as the verdict's token although it was right.
        drafted = min(drafted, accepted + 1)
        if accepted < drafted and current.tokens[accepted] == verdict.token:
            accepted += 1
    stats.record_round(drafted, accepted)
    stats.target_forwards += 1
    stats.verify_ms += server_ms
    network_ms = None
    if current is not None and not current.ahead:
        # Rounds sent ahead waited for the previous verdict too; only plain rounds time the network.
        network_ms = max(0.0, (time.perf_counter() - current.sent_at) * 1000.0 - server_ms)
        stats.network_ms += network_ms
    # A round sent ahead queues behind the previous one; that wait is overlap, not verification cost.
    verify_ms = verdict.forward_ms if current is not None and current.ahead else server_ms
    run.controller.observe_round(
        drafted=drafted, accepted=accepted, draft_ms=current.draft_ms if current else 0.0,
        network_ms=run.controller.estimate().network_ms if network_ms is None else network_ms,
        verify_ms=verify_ms)


async def _send_round(link: Link, run: Run) -> _Round | None:
    if len(link.session.committed) != len(run.committed):
        return None  # a verdict is waiting in the inbox: draft after it is handled
    gamma = min(run.controller.choose(run.remaining), link.max_gamma(len(run.committed)))
    prefix = list(run.committed)
    proposal, draft_ms = await link.in_drafter(lambda: _propose(link, run, prefix, gamma))
    run.stats.edge_ms += draft_ms
    if link.session.state is not ClientState.ACTIVE:
        return None  # the request ended while drafting; its events are waiting in the inbox
    number, frame = link.session.draft(proposal.tokens, proposal.wire())
    await link.send(frame)
    return _Round(number=number, prefix=prefix, tokens=proposal.tokens, draft_ms=draft_ms, ahead=False,
                  sent_at=time.perf_counter())


async def _catch_up(link: Link, run: Run) -> None:
    """Let the drafter read the streamed tokens before the round is timed: that forward is the price of
    having streamed, not of drafting, and timing it would make drafting look slower than it is."""
    drafter, prefix = link.drafter, list(run.committed)
    start = run.clock.ms()
    await link.in_drafter(lambda: (drafter.prefill(prefix), drafter.next_logits()))
    run.stats.edge_ms += run.clock.ms() - start


def _propose(link: Link, run: Run, prefix: list[int], gamma: int) -> tuple[DraftProposal, float]:
    start = time.perf_counter()
    proposal = link.drafter.propose(prefix, gamma, run.settings.sampling, run.settings.support_k, run.seed,
                                    run.stop_ids)
    return proposal, (time.perf_counter() - start) * 1000.0


def _start_ahead(link: Link, run: Run, current: _Round, room: int) -> _AheadJob:
    base = [*current.prefix, *current.tokens]
    gamma = max(1, min(run.controller.choose(room), link.max_gamma(len(base) + 1)))
    job = _AheadJob(gamma=gamma, base=base)
    loop = asyncio.get_running_loop()
    job.guess = loop.create_future()
    drafter, settings, seed, stop = link.drafter, run.settings, run.seed, run.stop_ids

    def work() -> tuple[list[DraftProposal], float]:
        # Assume every draft in flight is accepted and the bonus token is the draft's own best guess.
        drafter.prefill(base)
        guess = drafter.most_likely_next()
        loop.call_soon_threadsafe(job.guess.set_result, guess)
        start = time.perf_counter()
        sequence = [*base, guess]
        pieces: list[DraftProposal] = []
        for _ in range(job.gamma):  # one at a time, so an abort stops it between tokens
            if job.abort.is_set() or sequence[-1] in stop:
                break
            pieces.append(drafter.propose(sequence, 1, settings.sampling, settings.support_k, seed, stop))
            sequence += pieces[-1].tokens
        return pieces, (time.perf_counter() - start) * 1000.0

    job.task = asyncio.ensure_future(link.in_drafter(work))
    return job


async def _collect(run: Run, job: _AheadJob) -> tuple[list[DraftProposal], float]:
    pieces, draft_ms = await job.task
    run.stats.edge_ms += draft_ms
    return pieces, draft_ms


async def _finish_ahead(link: Link, run: Run, job: _AheadJob) -> _Round | None:
    """The ahead round is drafted: send it; the server verifies it only if the guess came true."""
    pieces, draft_ms = await _collect(run, job)
    if not pieces or link.session.state is not ClientState.ACTIVE:
        return None
    proposal = _merge(pieces)
    prefix = await job.prefix()
    # The session frames the round after *its* committed tokens, which already include any verdict
    # the reader received but this loop has not handled yet: assume only what comes after those.
    known = link.session.committed
    if known != prefix[: len(known)]:
        return None  # that verdict already ruled this round out
    number, frame = link.session.draft(proposal.tokens, proposal.wire(), assumed=prefix[len(known):])
    await link.send(frame)
    run.stats.ahead_rounds += 1
    run.controller.observe_draft_time(draft_ms / len(proposal.tokens))
    return _Round(number=number, prefix=prefix, tokens=proposal.tokens, draft_ms=draft_ms, ahead=True,
                  sent_at=time.perf_counter())


async def _drop_ahead(run: Run, job: _AheadJob) -> None:
    job.abort.set()
    await _collect(run, job)


async def _next_round_still_fits(run: Run, in_flight: list[_Round], job: _AheadJob | None) -> bool:
    """After a verdict: does the round sent or being drafted ahead continue the committed sequence?"""
    if in_flight:
        return in_flight[0].prefix == run.committed
    if job is not None:
        return await job.prefix() == run.committed
    return True  # nothing ahead: the next round is drafted from the committed tokens


def _merge(pieces: list[DraftProposal]) -> DraftProposal:
    tokens = [t for piece in pieces for t in piece.tokens]
    if pieces[0].proposal is None:
        return DraftProposal(tokens=tokens, proposal=None)
    return DraftProposal(tokens=tokens, proposal=ProposalDistribution(
        ids=torch.cat([p.proposal.ids for p in pieces]), probs=torch.cat([p.proposal.probs for p in pieces])))
