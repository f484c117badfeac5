"""One answer's speculative request: rounds of drafts and their verdicts, drafting ahead
(drafting_ahead.py), and — with a mode policy, ``Run.modes`` — stretches the verifier generates alone,
asked for with ``stream`` in the same request.

:class:`Speculation` is a small event loop: when nothing is in flight it sends what the policy says (a
round, a stream, or both), then hands each server event to its handler — :meth:`~Speculation.on_verdict`,
:meth:`~Speculation.on_streamed`, :meth:`~Speculation.on_discarded`. The committed sequence is the
session's, extended as the events are received here, so nothing mirrors it. Each round's drafts come
from where the :class:`~specd.desktop.client.round_planner.RoundPlanner` says — the draft model
(``drafter.propose(prefix, γ, …)``, which reconciles its own cache with ``prefix``), the context lookup
(context_lookup.py, which reconciles its index the same way), or the lookup continued by the model; a
looked-up round in flight may be followed by the lookup's next one, sent ahead without drafting.

Switching keeps the request, so the verifier keeps its KV cache and each position is produced once: by
a round or by a streamed step, chosen from what was measured so far (docs/protocol.md §5).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from specd.desktop.client.adaptive import Step
from specd.desktop.client.answer import Run, common_event, take_streamed
from specd.desktop.client.context_lookup import ContextLookup
from specd.desktop.client.drafting_ahead import DraftingAhead
from specd.desktop.client.link import Link
from specd.desktop.client.lookahead import LookupGuesses
from specd.desktop.client.round_planner import RoundPlanner
from specd.desktop.client.rounds import SentRound, propose_timed, with_lookup
from specd.desktop.client.stream_scoring import StreamScoring
from specd.shared.protocol import RoundDiscarded, RoundVerdict, TokensStreamed

_ROUND = Step(round=True)
# A streamed token that came this many usual gaps after the one before it: the stream had run dry.
STALL = 1.5


@dataclass(slots=True)
class _Streaming:
    """The stretch the verifier is generating alone: tokens asked for and not yet handled here."""

    owed: int = 0
    steady: bool = False  # the last tokens arrived with more still owed: the next gap is one decode step
    last_at: float = 0.0
    since_round: bool = False  # tokens were streamed since the last round: the drafter has not read them
    asked_at: float | None = None  # when a stream was asked with nothing in flight: its first token times the link
    topped_up_at: float | None = None  # when more tokens were asked while some were still owed ...
    before_top_up: int = 0  # ... and how many of those owed tokens come before the top-up's first
    token_gap_ms: float | None = None  # the usual gap between streamed tokens (a stall's left out)


async def speculate(link: Link, run: Run) -> None:
    """Run rounds until the request finishes or is cancelled; connection loss raises out of here."""
    await Speculation(link, run).run_to_end()


class Speculation:
    """The speculative request of one answer over ``link``."""

    def __init__(self, link: Link, run: Run) -> None:
        self.link, self.run = link, run
        self.modes = run.modes if link.session.can_stream else None  # a verifier that does not announce it
        # While the verifier streams, the idle drafter scores its tokens (acceptance, drafting time).
        self.scoring = StreamScoring(link, run, self.modes) if self.modes is not None else None
        self.streaming = _Streaming()
        self.in_flight: list[SentRound] = []
        self.ahead: DraftingAhead | None = None
        self.nothing_ahead_of: int | None = None  # the round in flight whose drafting ahead had nothing to send
        self.cancel_sent = False
        self.step: Step | None = None  # what to send once nothing is in flight (None: ask the policy then)
        lookup = ContextLookup() if run.settings.context_proposer else None
        self.planner = RoundPlanner(run.controller, lookup, run.context_acceptance)
        # The lookup as the model's guess, in the drafter's thread (lookahead.py).
        self.guesses = LookupGuesses(self.planner.acceptance) if lookup is not None else None

    async def run_to_end(self) -> None:
        """Send the request and handle its events until it ends; connection loss raises out of here."""
        link, run = self.link, self.run
        run.stop_ids = link.eos_ids() | frozenset(run.settings.stop)
        await link.send(run.open_request(link.session, "speculative"))
        try:
            self.step = self._next_step()
            if self.step.round:
                await self._catch_up()  # the prompt, while the verifier prefills it
            while not await self._turn():
                pass
        finally:
            if self.ahead is not None:
                await self.ahead.drop(run)
            if self.scoring is not None:
                await self.scoring.finish()
            run.close_request()

    async def _turn(self) -> bool:
        """Send what is due, wait for one event and handle it; True when the request is over."""
        link, run = self.link, self.run
        if run.cancelled and not self.cancel_sent:
            await link.send(link.session.cancel())
            self.cancel_sent = True
        if not self.cancel_sent and not self.in_flight and self.ahead is None and not self.streaming.owed:
            await self._send_step()
        await self._maybe_look_ahead()
        self._maybe_draft_ahead()
        event = await link.next_event(self.ahead.task if self.ahead else None, run.cancel_event)
        if event is None:  # the round drafted ahead is ready, or the user asked to cancel
            if self.ahead is not None and self.ahead.task.done():
                sent = await self.ahead.finish(link, run)
                self.ahead = None
                if sent is not None:
                    self.in_flight.append(sent)
                elif self.in_flight:  # e.g. the guess ends the answer: do not draft it again until the verdict
                    self.nothing_ahead_of = self.in_flight[0].number
            return False
        if isinstance(event, RoundVerdict):
            return await self.on_verdict(event)
        if isinstance(event, TokensStreamed):
            return await self.on_streamed(event)
        if isinstance(event, RoundDiscarded):
            await self.on_discarded(event)
            return False
        return common_event(run, event)

    # -- sending ----------------------------------------------------------------------------------
    def _next_step(self) -> Step:
        """What to send next; the mode policy's choice goes into the answer's decision trace."""
        if self.modes is None:
            return _ROUND
        if self.scoring is not None:
            self.scoring.collect()  # a score of the last streamed tokens, if it is ready
        step = self.modes.next_step(self.run.remaining)
        self.run.stats.on_mode_step(step)
        return step

    async def _send_step(self) -> None:
        step, self.step = self.step or self._next_step(), None
        if step.round:
            if self.scoring is not None:
                await self.scoring.finish()
            if self.streaming.since_round:
                await self._catch_up()
                self.streaming.since_round = False
            self.in_flight.append(await self._send_round())
        if step.stream:
            await self._ask_stream(step.stream)

    async def _send_round(self) -> SentRound:
        link, run, settings = self.link, self.run, self.run.settings
        prefix = list(run.committed)
        plan = self.planner.plan(prefix, run.remaining, link.max_gamma(len(prefix)), run.stop_ids)
        model, draft_ms = None, 0.0
        if plan.model_gamma:
            after = [*prefix, *plan.lookup]
            guess = None if self.guesses is None else self.guesses.for_round(prefix, plan.lookup, plan.model_gamma)
            model, draft_ms = await link.in_drafter(lambda: propose_timed(
                link.drafter, after, plan.model_gamma, settings.sampling, settings.support_k, run.seed, run.stop_ids,
                guess))
            run.stats.on_drafting(draft_ms, [model])
        proposal = with_lookup(plan.lookup, model, settings.sampling.greedy)
        number, frame = link.session.draft(proposal.tokens, proposal.wire())
        await link.send(frame)
        return SentRound(number=number, prefix=prefix, tokens=proposal.tokens, draft_ms=draft_ms, ahead=False,
                         sent_at=time.perf_counter(), context=len(plan.lookup), matched=plan.matched,
                         found=plan.found)

    async def _catch_up(self) -> None:
        """Let the drafter read what it has not (the prompt, streamed tokens) before a round is timed, all
        but the last token: that forward is the price of the prompt or of having streamed, not of drafting,
        and timing it would make drafting look slower than it is (a cold prompt read made a first round's
        drafts look 5× dearer). The last token is left for the round's first draft to read, as after any
        verdict, so the round times γ forwards of one token."""
        drafter, known, run = self.link.drafter, list(self.run.committed)[:-1], self.run
        if not known:
            return
        start = run.clock.ms()
        await self.link.in_drafter(lambda: (drafter.prefill(known), drafter.next_logits()))
        run.stats.on_drafting(run.clock.ms() - start)

    async def _ask_stream(self, tokens: int) -> None:
        session = self.link.session
        tokens = min(tokens, session.welcome.limits.max_stream_tokens)
        streaming = self.streaming
        if not streaming.owed and not self.in_flight and self.run.stats.generated:
            streaming.asked_at = time.perf_counter()  # (the first tokens of all wait for the prefill)
        elif streaming.owed and streaming.topped_up_at is None:
            streaming.topped_up_at, streaming.before_top_up = time.perf_counter(), streaming.owed
        await self.link.send(session.stream(tokens))
        streaming.owed += tokens

    async def _maybe_look_ahead(self) -> None:
        """While a round is verified, send the next one ahead if the lookup has it and it beats the model's
        round drafted ahead: no drafting."""
        run, in_flight, session = self.run, self.in_flight, self.link.session
        if (len(in_flight) != 1 or self.ahead is not None or self.cancel_sent or self.streaming.owed
                or not run.settings.pipeline or session.committed != in_flight[0].prefix):
            return
        current = in_flight[0]
        room = run.remaining - len(current.tokens) - 1
        position = len(current.prefix) + len(current.tokens) + 1
        found = self.planner.look_ahead(current.prefix, current.tokens, current.context, current.matched, room,
                                        self.link.max_gamma(position), run.stop_ids)
        if found is None:
            return
        guess, tokens, matched = found
        proposal = with_lookup(tokens, None, run.settings.sampling.greedy)
        number, frame = session.draft(proposal.tokens, proposal.wire(), assumed=[*current.tokens, guess])
        await self.link.send(frame)
        run.stats.on_round_sent_ahead()
        in_flight.append(SentRound(number=number, prefix=[*current.prefix, *current.tokens, guess], tokens=tokens,
                                   draft_ms=0.0, ahead=True, sent_at=time.perf_counter(), context=len(tokens),
                                   matched=matched))

    def _maybe_draft_ahead(self) -> None:
        run, in_flight = self.run, self.in_flight
        room = run.remaining - len(in_flight[0].tokens) - 1 if len(in_flight) == 1 else 0
        if (run.settings.pipeline and not self.cancel_sent and self.ahead is None and room >= 1
                and not self.streaming.owed  # a stream follows the round: its tokens, not a guess, come next
                and in_flight[0].number != self.nothing_ahead_of
                and run.controller.worth_drafting_ahead(len(in_flight[0].tokens), run.controller.choose(room))):
            current = in_flight[0]
            position = len(current.prefix) + len(current.tokens) + 1
            looked_up = self.planner.plan_ahead(current.prefix, current.tokens, room, self.link.max_gamma(position),
                                                run.stop_ids)
            self.ahead = DraftingAhead.start(self.link, run, current, room, looked_up, self.guesses)

    # -- events -----------------------------------------------------------------------------------
    async def on_verdict(self, event: RoundVerdict) -> bool:
        run, in_flight = self.run, self.in_flight
        current = in_flight.pop(0) if in_flight and in_flight[0].number == event.verdict.round else None
        self._account(event, current)
        if self.ahead is not None and current is not None and event.verdict.accepted == event.drafted:
            hit = self.ahead.guessed(event.verdict.token)
            if hit is not None:
                run.controller.observe_guess(hit)
        run.emit(event.new_tokens[:-1], "draft")
        run.emit(event.new_tokens[-1:], "target")
        if event.finished:
            run.finish_reason = event.verdict.reason
            return True
        if not await self._next_round_still_fits():
            await self._forget_rounds_ahead()  # rounds already sent ahead come back as 'discarded'
        return False

    async def on_streamed(self, event: TokensStreamed) -> bool:
        """Tokens the verifier generated alone; True when they end the answer."""
        streaming, modes = self.streaming, self.modes
        now = time.perf_counter()
        count = len(event.tokens.tokens)
        gap_ms = (now - streaming.last_at) * 1000.0 if streaming.steady else None
        stalled = (gap_ms is not None and streaming.token_gap_ms is not None
                   and gap_ms / count > STALL * streaming.token_gap_ms)
        if gap_ms is not None and not stalled:
            usual = streaming.token_gap_ms
            streaming.token_gap_ms = gap_ms / count if usual is None else usual + 0.2 * (gap_ms / count - usual)
        if streaming.topped_up_at is not None:
            streaming.before_top_up -= count
            if streaming.before_top_up < 0:  # these tokens include the top-up's first
                if stalled:
                    # The stream ran dry before the top-up arrived: it came a round trip and its forward
                    # after the ask. The round trip was too short to ask far enough ahead: measure it (a
                    # stale one, from before the link got slower, would stall every top-up) and keep the
                    # stall out of what a streamed token costs.
                    elapsed_ms = (now - streaming.topped_up_at) * 1000.0
                    self.run.controller.observe_stall(elapsed_ms - event.tokens.forward_ms)
                    gap_ms = None
                streaming.topped_up_at = None
        streaming.owed = max(0, streaming.owed - count)
        streaming.steady, streaming.last_at, streaming.since_round = streaming.owed > 0, now, True
        if streaming.asked_at is not None:
            # A stream asked with nothing in flight: its first tokens came a round trip and their forward
            # after the ask. While streaming, rounds are rare, and this keeps the round trip current (the
            # tokens to ask for ahead and a fresh stream's rate depend on it).
            elapsed_ms = (now - streaming.asked_at) * 1000.0
            self.run.controller.observe_network(max(0.0, elapsed_ms - event.tokens.forward_ms))
            streaming.asked_at = None
        if modes is not None:
            modes.observe_stream(count, event.tokens.forward_ms, gap_ms)
        if take_streamed(self.run, event):
            return True
        if self.scoring is not None:
            self.scoring.add(event)
        if modes is not None and not self.cancel_sent:
            more = modes.top_up(self.run.remaining, streaming.owed)
            if more > 0:
                await self._ask_stream(more)
        return False

    async def on_discarded(self, event: RoundDiscarded) -> None:
        self.run.stats.on_round_discarded()
        if any(r.number == event.discarded.round for r in self.in_flight):
            # The server did not build on what this round assumed, so neither can anything drafted after
            # it: forget those drafts and draft again from the committed tokens.
            await self._forget_rounds_ahead()

    def _account(self, event: RoundVerdict, current: SentRound | None) -> None:
        run, verdict = self.run, event.verdict
        server_ms = verdict.queue_ms + verdict.forward_ms
        drafted, accepted = event.verified, verdict.accepted  # drafts the budget left unverified were not judged
        run.controller.observe_server_gamma(event.suggested_gamma)
        run.controller.observe_server_step(event.decode_step_ms)
        if verdict.finished and current is not None:
            # The request ended inside the round: drafts after the stop were never judged, and a draft that
            # was itself the stop token comes back as the verdict's token although it was right.
            drafted = min(drafted, accepted + 1)
            if accepted < drafted and current.tokens[accepted] == verdict.token:
                accepted += 1
        network_ms = None
        if current is not None and not current.ahead:
            # Rounds sent ahead waited for the previous verdict too; only plain rounds time the network.
            network_ms = max(0.0, (time.perf_counter() - current.sent_at) * 1000.0 - server_ms)
        looked_up = min(current.context, drafted) if current is not None else 0
        run.stats.on_round_verdict(drafted, accepted, server_ms, network_ms, context=looked_up)
        # The answer's first round (unless a stream came first) waits for the prompt's prefill: its
        # acceptance and drafting time count (the drafter read the prompt untimed), its wait would mislead.
        cold = run.stats.rounds == 1 and run.stats.cloud_tokens == 0
        if current is not None:
            self.planner.observe(looked_up, accepted, current.matched, current.found, event.new_tokens)
        if looked_up and (accepted < looked_up or drafted == looked_up):
            # The model's drafts were not judged (or there were none): the round says nothing of its
            # acceptance or drafting time, only of the round trip.
            if network_ms is not None:
                run.controller.observe_network(network_ms)
            return
        # A round sent ahead queues behind the previous one; that wait is overlap, not verification cost.
        verify_ms = verdict.forward_ms if current is not None and current.ahead else server_ms
        run.controller.observe_round(
            drafted=drafted - looked_up, accepted=accepted - looked_up, draft_ms=current.draft_ms if current else 0.0,
            network_ms=run.controller.estimate().network_ms if network_ms is None else network_ms,
            verify_ms=verify_ms, cold=cold)

    async def _next_round_still_fits(self) -> bool:
        """After a verdict: does the round sent or being drafted ahead continue the committed sequence?"""
        if self.in_flight:
            return self.in_flight[0].prefix == self.run.committed
        if self.ahead is not None:
            return await self.ahead.prefix() == self.run.committed
        return True  # nothing ahead: the next round is drafted from the committed tokens

    async def _forget_rounds_ahead(self) -> None:
        """Forget the rounds in flight and the one being drafted ahead (the next round is drafted from the
        committed tokens; the drafter reconciles its cache itself)."""
        if self.ahead is not None:
            await self.ahead.drop(self.run)
            self.ahead = None
        self.in_flight.clear()
