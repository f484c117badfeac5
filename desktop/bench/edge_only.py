"""The benchmark's edge-only baseline: the draft model answering alone, with no verifier.

A baseline to compare against, not a client mode: the client's local mode (client/cloud_local.py)
is the same loop run only while the verifier is unreachable.
"""

from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import Executor
from typing import Any

from specd.desktop.client.answer import Answer, PieceCallback, Run, Settings
from specd.desktop.client.cloud_local import local_step
from specd.desktop.drafters.base import Drafter
from specd.shared.hf_models import eos_ids
from specd.shared.protocol.stopping import stop_reason


async def generate_edge_only(drafter: Drafter, tokenizer: Any, prompt_ids: list[int], settings: Settings,
                             on_piece: PieceCallback | None = None, *, eos: frozenset[int] | None = None,
                             executor: Executor | None = None) -> Answer:
    """The draft model alone, no verifier (the benchmark's edge-only baseline)."""
    eos = eos if eos is not None else frozenset(eos_ids(tokenizer))
    seed = settings.seed if settings.seed is not None else secrets.randbits(63)
    loop = asyncio.get_running_loop()
    run = Run.begin(prompt_ids, settings, seed, tokenizer, on_piece)
    run.stats.on_drafter(drafter.device, drafter.backend)
    run.finish_reason = "length"
    await loop.run_in_executor(executor, drafter.prefill, list(prompt_ids))
    while run.remaining > 0:
        token = await loop.run_in_executor(executor, local_step, drafter, settings.sampling, seed)
        run.emit([token], "local")
        stop = stop_reason(token, eos, settings.stop)
        if stop is not None:
            run.finish_reason = stop
            break
    total_ms = run.clock.ms()
    run.stats.on_drafting(total_ms)
    run.stats.on_answer_end("edge-only", total_ms)
    return run.answer()
