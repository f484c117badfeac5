"""While the verifier streams alone, the idle drafter measures what a round would get.

A streamed token x was sampled from the target's p, and in a ``stream`` the verifier sends p(x) with it
(``tokens.probs``). The draft's proposal q at that position is the distribution a round would have drafted
from (the same sampling and support), so min(1, q(x)/p(x)) is an unbiased sample of the acceptance a
draft there would have had: E over x ~ p of min(1, q(x)/p(x)) is Σ min(p, q) = α (greedy: 1 when the draft's
most likely token is x, else 0). The one-token forward that gives q is a draft step, timed warm. So while
streaming, acceptance and drafting time stay current without a probe round — the mode chooser can switch
back as soon as rounds would win — and the drafter has read the stream when they do.

Scoring takes the drafter's one thread for at most the share of its time the mode policy allows
(``scoring_share``: more while rounds are within reach than while even a round accepted in full would lose
to streaming), and never builds a queue: of the tokens that came since the last score only the newest is
scored (the others are read in one forward before it, untimed). Which tokens are scored never depends on
what they are, so the samples stay unbiased.
"""

from __future__ import annotations

import asyncio
import time

import torch

from specd.desktop.client.adaptive import ModePolicy
from specd.desktop.client.answer import Run
from specd.desktop.client.link import Link
from specd.desktop.drafters.base import Drafter, draft_proposal
from specd.shared.protocol import TokensStreamed
from specd.shared.protocol.codec import common_prefix
from specd.shared.sampling import SamplingParams


def acceptance_sample(logits: torch.Tensor, token: int, target_prob: float, params: SamplingParams,
                      support_k: int) -> float:
    """min(1, q(token)/p(token)) for the draft's ``logits`` ``[V]`` at the token's position (greedy: whether
    the draft's most likely token is ``token``)."""
    if params.greedy:
        return 1.0 if int(logits.argmax()) == token else 0.0
    proposal = draft_proposal(logits.unsqueeze(0), params, support_k)
    q = float(proposal.probs[0][proposal.ids[0] == token].sum())
    return min(1.0, q / target_prob) if target_prob > 0 else 1.0


def score_token(drafter: Drafter, before: list[int], token: int, target_prob: float, params: SamplingParams,
                support_k: int) -> tuple[float, float, float]:
    """Read ``before`` (the committed tokens up to the streamed ``token``) and score the token: its
    acceptance sample, the milliseconds of the one-token forward and proposal that gave it (a draft step:
    the tokens before its last are read first, untimed), and the milliseconds the drafter worked."""
    start = time.perf_counter()
    if len(before) - common_prefix(drafter.tokens(), before) > 1:
        drafter.prefill(before[:-1])
        drafter.next_logits()
    drafter.prefill(before)
    timed = time.perf_counter()
    sample = acceptance_sample(drafter.next_logits(), token, target_prob, params, support_k)
    end = time.perf_counter()
    return sample, (end - timed) * 1000.0, (end - start) * 1000.0


class StreamScoring:
    """The streamed tokens of one answer, scored by the drafter between its rounds (module docstring)."""

    def __init__(self, link: Link, run: Run, policy: ModePolicy) -> None:
        self.link, self.run, self.policy = link, run, policy
        self.newest: tuple[int, int, float] | None = None  # (position, token, p) of the newest unscored token
        self.task: asyncio.Future | None = None
        self.idle_until = 0.0  # perf_counter time before which the drafter does not score again

    def add(self, event: TokensStreamed) -> None:
        """Streamed tokens (already committed): score the newest once the drafter may."""
        tokens = event.tokens
        if not tokens.tokens or len(tokens.probs) != len(tokens.tokens):
            return  # a server that does not send p, or cloud mode
        last = len(tokens.tokens) - 1
        self.newest = (tokens.position + last, tokens.tokens[last], tokens.probs[last])
        self.collect()

    def collect(self) -> None:
        """Take a finished score into the estimates, and start the next one if a token waits and the
        drafter's share allows."""
        task = self.task
        if task is not None and task.done():
            self.task = None
            self._learn(task.result())
        if self.task is None and self.newest is not None and time.perf_counter() >= self.idle_until:
            position, token, prob = self.newest
            self.newest = None
            before = list(self.run.committed[:position])
            if before and self.policy.scoring_share(self.run.remaining) > 0:
                drafter, settings = self.link.drafter, self.run.settings
                self.task = asyncio.ensure_future(self.link.in_drafter(lambda: score_token(
                    drafter, before, token, prob, settings.sampling, settings.support_k)))

    async def finish(self) -> None:
        """Before the drafter drafts a round, or the answer ends: let the score in progress end (its result
        counts) and forget the token that waits (the round reads it anyway)."""
        self.newest = None
        if self.task is not None:
            task, self.task = self.task, None
            self._learn(await task)

    def _learn(self, result: tuple[float, float, float]) -> None:
        sample, step_ms, worked_ms = result
        run = self.run
        run.controller.observe_streamed_acceptance(sample)
        run.controller.observe_draft_time(step_ms)
        run.stats.on_stream_scored(sample, worked_ms)
        share = self.policy.scoring_share(run.remaining)
        rest_ms = worked_ms * (1.0 / share - 1.0) if share > 0 else float("inf")
        self.idle_until = time.perf_counter() + min(rest_ms, 60_000.0) / 1000.0
