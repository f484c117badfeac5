"""Answers without speculation: cloud-only (no drafter), local (verifier unreachable) and edge-only.

Cloud-only asks the verifier to generate alone and stream its tokens. Local generation samples the
draft model alone (``LOCAL_STREAM`` draws keyed by position, so it is reproducible for a seed) while a
background task reconnects with backoff; as soon as the verifier answers again the caller resumes
speculation from the committed tokens. Edge-only is the benchmark's draft-alone baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from specd.desktop.client.answer import Answer, AnswerStats, Piece, Settings, Stopwatch
from specd.desktop.client.connection import ConnectionFailed, backoff_delays
from specd.desktop.client.detokenize import IncrementalDetokenizer
from specd.desktop.drafters.base import Drafter
from specd.shared.protocol import TokensStreamed
from specd.shared.sampling import LOCAL_STREAM, SamplingParams, position_generator, sample, target_probs

if TYPE_CHECKING:
    from specd.desktop.client.edge_client import EdgeClient, PieceCallback, Run


async def generate_cloud(client: EdgeClient, run: Run) -> None:
    """The verifier generates alone and streams; connection loss raises ``Disconnected``."""
    from specd.desktop.client.edge_client import common_event

    session = client.session
    await client.send(session.start(list(run.committed), max_new_tokens=run.remaining, sampling=run.wire_sampling,
                                    seed=run.seed, stop=list(run.settings.stop), mode="cloud"))
    cancel_sent = False
    while True:
        if run.cancelled and not cancel_sent:
            await client.send(session.cancel())
            cancel_sent = True
        event = await client.next_event(None, run.cancel_event)
        if event is None:
            continue
        if isinstance(event, TokensStreamed):
            tokens = event.tokens
            run.stats.target_forwards += len(tokens.tokens)
            run.stats.verify_ms += tokens.forward_ms
            run.emit(list(tokens.tokens), "cloud")
            if tokens.finished:
                run.finish_reason = tokens.reason
                return
        elif common_event(run, event):
            return


def local_step(drafter: Drafter, params: SamplingParams, seed: int) -> int:
    """One token from the draft model alone, appended to it (runs in the drafter thread)."""
    logits = drafter.next_logits()
    if params.greedy:
        token = int(logits.argmax())
    else:
        generator = position_generator(seed, drafter.token_count, LOCAL_STREAM)
        token = sample(target_probs(logits.unsqueeze(0), params)[0], generator)
    drafter.append([token])
    return token


def stop_reason(token: int, eos: frozenset[int], stop: tuple[int, ...]) -> str | None:
    if token in eos:
        return "eos"
    if token in stop:
        return "stop"
    return None


async def generate_local(client: EdgeClient, run: Run) -> None:
    """Continue with the draft model while reconnecting; return once reconnected or finished."""
    drafter = client.drafter
    assert drafter is not None
    client.set_state("local", f"the verifier at {client.endpoint.display} is unreachable; continuing on the "
                              f"{drafter.device} draft model (marked local)")
    reconnector = asyncio.create_task(reconnect(client))
    eos = client.eos_ids()
    try:
        await client.in_drafter(lambda: drafter.prefill(run.committed))
        while run.remaining > 0 and not reconnector.done():
            if run.cancelled:
                run.finish_reason = "cancelled"
                return
            start = run.clock.ms()
            token = await client.in_drafter(lambda: local_step(drafter, run.settings.sampling, run.seed))
            run.stats.edge_ms += run.clock.ms() - start
            run.emit([token], "local")
            reason = stop_reason(token, eos, run.settings.stop)
            if reason is not None:
                run.finish_reason = reason
                return
    finally:
        if not reconnector.done():
            reconnector.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reconnector


async def reconnect(client: EdgeClient, deadline_s: float | None = None) -> bool:
    """Retry the connection with exponential backoff; False when refused for good or out of time."""
    loop = asyncio.get_running_loop()
    end = None if deadline_s is None else loop.time() + deadline_s
    for delay in backoff_delays(client.reconnect_max_s):
        if end is not None:
            if loop.time() >= end:
                return False
            delay = min(delay, max(0.0, end - loop.time()))
        await asyncio.sleep(delay)
        try:
            await client.connect()
            return True
        except ConnectionFailed as exc:
            if not exc.retry:
                client.set_state("offline", str(exc))
                return False
    return False  # pragma: no cover - backoff_delays never ends


async def wait_for_verifier(client: EdgeClient, run: Run) -> bool:
    """Cloud-only answers cannot continue offline: wait (bounded, cancellable) for the verifier."""
    client.set_state("offline", f"lost the verifier at {client.endpoint.display}; reconnecting")
    waiter = asyncio.create_task(reconnect(client, deadline_s=max(5.0, client.reconnect_max_s)))
    cancel = asyncio.create_task(run.cancel_event.wait())
    try:
        await asyncio.wait({waiter, cancel}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cancel.cancel()
    if not waiter.done():
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        return False
    return waiter.result()


async def generate_edge_only(drafter: Drafter, tokenizer: Any, prompt_ids: list[int], settings: Settings,
                             on_piece: PieceCallback | None = None, *, eos: frozenset[int] | None = None,
                             executor: Any = None) -> Answer:
    """The draft model alone, no verifier (the benchmark's edge-only baseline)."""
    import secrets

    eos = eos if eos is not None else eos_of(tokenizer)
    seed = settings.seed if settings.seed is not None else secrets.randbits(63)
    loop = asyncio.get_running_loop()
    stats = AnswerStats(mode="edge-only", device=drafter.device, backend=drafter.backend)
    detok, pieces, tokens = IncrementalDetokenizer(tokenizer), [], []
    clock, reason = Stopwatch(), "length"
    await loop.run_in_executor(executor, drafter.prefill, list(prompt_ids))
    while len(tokens) < settings.max_new_tokens:
        token = await loop.run_in_executor(executor, local_step, drafter, settings.sampling, seed)
        if not tokens:
            stats.ttft_ms = clock.ms()
        tokens.append(token)
        pieces.append(Piece(token_ids=[token], text=detok.push([token]), source="local"))
        if on_piece is not None:
            on_piece(pieces[-1])
        stop = stop_reason(token, eos, settings.stop)
        if stop is not None:
            reason = stop
            break
    tail = detok.flush()
    if tail:
        pieces.append(Piece(token_ids=[], text=tail, source="local"))
        if on_piece is not None:
            on_piece(pieces[-1])
    stats.generated = stats.local_tokens = len(tokens)
    stats.total_ms = stats.edge_ms = clock.ms()
    return Answer(text=detok.text, prompt_token_ids=list(prompt_ids), token_ids=tokens, finish_reason=reason,
                  stats=stats, pieces=pieces)


def eos_of(tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids from a tokenizer (and its generation config's extras, when it has them)."""
    ids: set[int] = set()
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(i) for i in eos)
    return frozenset(ids)
