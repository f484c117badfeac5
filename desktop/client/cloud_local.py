"""The two answer modes without speculation: cloud-only (no drafter) and local (verifier unreachable).

Cloud-only asks the verifier to generate alone and stream its tokens. Local generation samples the
draft model alone (``LOCAL_STREAM`` draws keyed by position, so it is reproducible for a seed) until
the reconnection the client started succeeds; the client then resumes speculation from the
committed tokens.
"""

from __future__ import annotations

import asyncio

from specd.desktop.client.answer import Run, common_event, take_streamed
from specd.desktop.client.link import Link
from specd.desktop.drafters.base import Drafter
from specd.shared.protocol import TokensStreamed
from specd.shared.protocol.stopping import stop_reason
from specd.shared.sampling import LOCAL_STREAM, SamplingParams, position_generator, sample, target_probs


async def generate_cloud(link: Link, run: Run) -> None:
    """The verifier generates alone and streams; connection loss raises ``Disconnected``."""
    await link.send(run.open_request(link.session, "cloud"))
    cancel_sent = False
    try:
        while True:
            if run.cancelled and not cancel_sent:
                await link.send(link.session.cancel())
                cancel_sent = True
            event = await link.next_event(None, run.cancel_event)
            if event is None:
                continue
            if isinstance(event, TokensStreamed):
                if take_streamed(run, event):
                    return
            elif common_event(run, event):
                return
    finally:
        run.close_request()


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


async def generate_local(link: Link, run: Run, reconnected: asyncio.Future) -> None:
    """Continue with the draft model alone; return once ``reconnected`` is done or the answer finished."""
    drafter = link.drafter
    assert drafter is not None
    eos = link.eos_ids()
    await link.in_drafter(lambda: drafter.prefill(run.committed))
    while run.remaining > 0 and not reconnected.done():
        if run.cancelled:
            run.finish_reason = "cancelled"
            return
        start = run.clock.ms()
        token = await link.in_drafter(lambda: local_step(drafter, run.settings.sampling, run.seed))
        run.stats.on_drafting(run.clock.ms() - start)
        run.emit([token], "local")
        reason = stop_reason(token, eos, run.settings.stop)
        if reason is not None:
            run.finish_reason = reason
            return
