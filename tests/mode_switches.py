"""Answers that switch between speculative rounds and the verifier streaming alone, at seeded points.

:class:`ScriptedSwitches` is a mode policy (``desktop/client/adaptive.py`` ``ModePolicy``) that decides
from its own random stream, keyed by the answer's seed but independent of every draw the draft and the
verifier make (docs/protocol.md §5): a round, a stretch streamed alone, or a probe (a round and a stretch
at once), and whether to ask for more while streaming. It depends only on the past, as the product's
chooser does, so the answers still follow the target's law; :func:`switching_answer` plugs it into the
lossless harness (``drive=``) and the greedy-equality tests.
"""

from __future__ import annotations

import random
from dataclasses import replace

from specd.desktop.client.adaptive import Step
from specd.desktop.client.answer import Answer, Settings
from specd.desktop.client.edge_client import EdgeClient


class ScriptedSwitches:
    """Random mode switches, reproducible for a seed: every kind of step occurs within a few tokens."""

    def __init__(self, seed: int, *, longest: int = 3) -> None:
        self.random = random.Random(f"mode switches {seed}")
        self.longest = longest
        self.steps: list[str] = []  # what was chosen, for the tests to check both ways occurred

    def next_step(self, remaining: int) -> Step:
        kind = self.random.choice(("round", "stream", "probe"))
        self.steps.append(kind)
        if kind == "round" or remaining <= 1:
            return Step(round=True)
        tokens = self.random.randint(1, self.longest)
        return Step(round=kind == "probe", stream=tokens)

    def top_up(self, remaining: int, owed: int) -> int:
        if remaining <= owed or self.random.random() < 0.7:  # mostly let a stretch end, so rounds come back
            return 0
        self.steps.append("more")
        return self.random.randint(1, self.longest)

    def observe_stream(self, tokens: int, forward_ms: float, gap_ms: float | None) -> None:
        pass

    def scoring_share(self, remaining: int) -> float:
        return 0.5  # the drafter scores streamed tokens, as under the product's chooser


async def switching_answer(client: EdgeClient, prompt: list[int], settings: Settings) -> list[Answer]:
    """One answer whose mode switches at points drawn from its seed (a ``drive=`` for the harness)."""
    client.modes = ScriptedSwitches(settings.seed or 0)
    return [await client.generate(prompt, replace(settings, mode_switching=True))]
