"""Helpers for the daemon tests: a config for a model folder, and a minimal protocol client.

The client is ``shared.protocol.client.ClientSession`` over ``websockets.asyncio.client`` — what a third-party
client written from docs/protocol.md would do — so the daemon is tested without the desktop code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import torch
from websockets.asyncio.client import ClientConnection, connect

from specd.shared import messages as m
from specd.shared.config import Config, load_config
from specd.shared.protocol import ClientEvent, ClientSession, RoundVerdict, TokensStreamed
from specd.shared.sampling import (
    VERIFY_STREAM,
    ProposalDistribution,
    RoundResult,
    SamplingParams,
    encode_proposal,
    position_generator,
    target_probs,
    verify_greedy,
    verify_round,
)


def daemon_config(model: Any, **limits: Any) -> Config:
    """Loopback, a free port, the CPU, no config file, and any ``[limits]`` overrides."""
    return load_config(None, {"server": {"host": "127.0.0.1", "port": 0, "device": "cpu", "api_key_env": ""},
                              "models": {"target": str(model)}, "limits": limits,
                              "speculation": {"gamma_max": min(8, limits.get("max_draft", 8))}})


class Client:
    """One connection speaking the protocol through a ``ClientSession``."""

    def __init__(self, ws: ClientConnection, session: ClientSession) -> None:
        self.ws = ws
        self.session = session

    @classmethod
    async def open(cls, url: str, tokenizer: str, *, api_key: str | None = None, hello: bool = True,
                   ssl: Any = None) -> Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        ws = await connect(url, additional_headers=headers, compression=None, max_size=None, ssl=ssl)
        client = cls(ws, ClientSession(tokenizer=tokenizer, client="specd-tests"))
        if hello:
            await ws.send(client.session.hello())
            await client.events()
        return client

    async def events(self, timeout: float = 30.0) -> list[ClientEvent]:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        return self.session.receive(frame)

    async def message(self, timeout: float = 30.0) -> m.ServerMessage:
        """The next raw server message (for tests that break the protocol on purpose)."""
        return m.decode_server(await asyncio.wait_for(self.ws.recv(), timeout))

    async def start(self, prompt: list[int], max_new_tokens: int, **kwargs: Any) -> list[ClientEvent]:
        await self.ws.send(self.session.start(prompt, max_new_tokens=max_new_tokens, **kwargs))
        return await self.events()

    async def round(self, drafts: list[int], proposal: ProposalDistribution | None = None) -> RoundVerdict:
        _rnd, frame = self.session.draft(drafts, None if proposal is None else encode_proposal(proposal))
        await self.ws.send(frame)
        (event,) = await self.events()
        assert isinstance(event, RoundVerdict), event
        return event

    async def stream_all(self) -> list[int]:
        while not self.session.finished:
            for event in await self.events():
                assert isinstance(event, TokensStreamed), event
        return self.session.generated

    async def close(self) -> None:
        await self.ws.close()


def direct_verdict(model: Any, committed: list[int], drafts: list[int], proposal: ProposalDistribution | None,
                   params: SamplingParams, seed: int) -> RoundResult:
    """What docs/protocol.md §4–5 says the verdict must be, computed with a full forward (no cache)."""
    with torch.inference_mode():
        logits = model(torch.tensor([committed + drafts])).logits[0].float()
    window = logits[len(committed) - 1:]
    draft_ids = torch.tensor(drafts)
    if params.greedy:
        return verify_greedy(draft_ids, window)
    p = target_probs(window, params)
    assert proposal is not None
    return verify_round(draft_ids, proposal, p, position_generator(seed, len(committed), VERIFY_STREAM))


def greedy_reference(model: Any, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """transformers' own greedy decoding, the baseline cloud-only mode must equal."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             pad_token_id=eos[0], temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt):].tolist()


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Wait until ``condition()`` holds (a closed connection frees its slot a few loop turns later). The
    timeout only guards against a hang: the checks are on the state, never on how long it took."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.02)
