"""Running the benchmark: every mode on the same prompts, seeds and verifier, interleaved, at each RTT.

Modes (see :data:`~specd.desktop.bench.figures.MODES`):

- ``cloud-only``: the verifier generates alone and streams (the baseline every speedup divides by);
- ``edge-only``: the draft model alone on the edge device, no verifier;
- ``spec-fixed``: speculative with a fixed γ, no pipelining, rounds only (no mode switching);
- ``spec-adaptive``: γ chosen each round from measured acceptance and times, no pipelining;
- ``spec-pipelined``: adaptive γ, drafting the next round while one is verified;
- ``spec-no-context``: as spec-pipelined, without the context proposer (only when asked for by name: the
  pair measures what drafts looked up in the conversation bring).

The adaptive modes switch to the verifier streaming alone where that is faster, as the config says
(``[speculation] mode_switching``, on by default); their stats split tokens and time by mode.

All verifier traffic goes through a :class:`~specd.desktop.bench.netem.ThreadedProxy` whose delay is set
to each ``--rtt-ms`` in turn. Modes take turns prompt by prompt, so a change in the machine's load (other
programs, thermal limits) touches every mode alike rather than one of them; their order rotates from
prompt to prompt. Before each measured answer its client answers another question in one token, so every
answer reads its prompt as a new question does — the drafter's prefill and the verifier's — and none
finds it cached by the mode or iteration before it (only the system prompt, which every question shares).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlparse

from specd.desktop.bench.edge_only import generate_edge_only
from specd.desktop.bench.figures import BASELINE, DEFAULT_MODES, RunRecord, SessionsRecord
from specd.desktop.bench.netem import ThreadedProxy
from specd.desktop.bench.prompts import BenchPrompt
from specd.desktop.client.answer import Answer, Settings
from specd.desktop.client.stats_line import stats_line
from specd.desktop.commands.launch import ClientSetup, build_client, with_draft
from specd.desktop.precision.measure import settle_precision
from specd.shared.config import Config
from specd.shared.errors import SpecdError

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class BenchPlan:
    prompts: list[BenchPrompt]
    settings: Settings  # sampling, max_new_tokens, seed (the base of every answer's seed)
    modes: tuple[str, ...] = DEFAULT_MODES
    rtts_ms: tuple[float, ...] = (0.0,)
    iterations: int = 2
    devices: tuple[str | None, ...] = (None,)  # None: the config's [devices] edge_device
    gamma: int = 4  # spec-fixed
    sessions: tuple[int, ...] = ()  # concurrent edge clients for the multi-session figure
    warmup: bool = True
    model_path: str | None = None

    def answers(self) -> int:
        """How many answers the main loop measures (for the progress display)."""
        edge_modes = [m for m in self.modes if m != BASELINE]
        per_prompt = len(edge_modes) * len(self.devices) + (BASELINE in self.modes)
        return per_prompt * len(self.prompts) * self.iterations * len(self.rtts_ms)


@dataclass(slots=True)
class DeviceRun:
    """One edge device that was benchmarked (or could not be)."""

    requested: str
    label: str  # the row id, e.g. "onnxruntime-genai:cpu"; the requested name when it failed
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(slots=True)
class BenchResult:
    records: list[RunRecord] = field(default_factory=list)
    sessions: list[SessionsRecord] = field(default_factory=list)
    devices: list[DeviceRun] = field(default_factory=list)
    welcome: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0


def mode_settings(mode: str, base: Settings, gamma: int) -> Settings:
    """The client settings a mode runs with."""
    if mode == "spec-fixed":
        return replace(base, gamma=gamma, pipeline=False, mode_switching=False)
    if mode == "spec-adaptive":
        return replace(base, gamma=None, pipeline=False)
    if mode == "spec-pipelined":
        return replace(base, gamma=None, pipeline=True)
    if mode == "spec-no-context":
        return replace(base, gamma=None, pipeline=True, context_proposer=False)
    return base


def answer_seed(base: int | None, prompt_index: int, iteration: int) -> int:
    """The same seed for every mode of one (prompt, iteration), so their outputs are comparable."""
    return (base if base is not None else 1234) + 1000 * prompt_index + iteration


class BenchRunner:
    """Runs a :class:`BenchPlan` against the verifier at ``url`` (local or remote)."""

    def __init__(self, config: Config, plan: BenchPlan, url: str, *, say: Say | None = None,
                 emulate: bool = True) -> None:
        self.config, self.plan, self.url = config, plan, url
        self.say = say or (lambda _msg: None)
        self.emulate = emulate
        self.result = BenchResult()
        self._done = 0
        self._proxy: ThreadedProxy | None = None

    # -- set-up -----------------------------------------------------------------------------------
    def _client_url(self) -> str:
        return self._proxy.url(urlparse(self.url).scheme) if self._proxy is not None else self.url

    async def _build(self, device: str | None, *, drafter: bool = True) -> ClientSetup:
        setup = await asyncio.to_thread(build_client, self.config, device=device, model_path=self.plan.model_path,
                                        progress=self.say, drafter=drafter, url=self._client_url())
        setup.client.endpoint = replace(setup.client.endpoint, url=self._client_url())
        return setup

    async def run(self) -> BenchResult:
        started = time.perf_counter()
        target = urlparse(self.url)
        if self.emulate:
            if target.scheme == "wss" and any(self.plan.rtts_ms):
                raise SpecdError("--rtt-ms emulation needs a ws:// verifier: the loopback proxy cannot present a "
                                 "wss:// server's certificate name; measure a TLS verifier over its real network")
            if target.scheme == "ws":
                self._proxy = ThreadedProxy(target.hostname or "127.0.0.1", target.port or 80).start()
        setups: list[ClientSetup] = []
        try:
            cloud = await self._build(None, drafter=False) if BASELINE in self.plan.modes else None
            if cloud is not None:
                welcome = await cloud.client.connect()
                self.result.welcome = {"model": welcome.model, "server": welcome.server,
                                       "max_draft": welcome.limits.max_draft}
            edges: list[tuple[DeviceRun, ClientSetup]] = []
            if any(m != BASELINE for m in self.plan.modes) or self.plan.sessions:
                for device in self.plan.devices:
                    run, setup = await self._open_device(device)
                    self.result.devices.append(run)
                    if setup is not None:
                        edges.append((run, setup))
                        setups.append(setup)
            if self.plan.warmup:
                await self._warm_up(cloud, edges)
            for rtt in self.plan.rtts_ms:
                self._set_rtt(rtt)
                for index, prompt in enumerate(self.plan.prompts):
                    for iteration in range(self.plan.iterations):
                        await self._measure_prompt(cloud, edges, prompt, index, iteration, rtt)
            if self.plan.sessions and edges:
                self._set_rtt(self.plan.rtts_ms[0])
                await self._measure_sessions(edges[0][0], edges[0][1], setups)
            if cloud is not None:
                await cloud.client.close()
        finally:
            for setup in setups:
                await _close(setup)
            if self._proxy is not None:
                self._proxy.stop()
        self.result.wall_s = time.perf_counter() - started
        return self.result

    def _set_rtt(self, rtt: float) -> None:
        if self._proxy is not None:
            self._proxy.rtt_ms = rtt
        self.say(f"Network: {rtt:g} ms round trip added" if self._proxy is not None
                 else "Network: the real one (no emulation)")

    async def _open_device(self, device: str | None) -> tuple[DeviceRun, ClientSetup | None]:
        requested = device or self.config.devices.edge_device
        setup = await self._build(device)
        if setup.choice is None:
            await setup.client.close()
            return DeviceRun(requested, requested, error=setup.drafter_error or "no drafter"), None
        row = setup.choice.row
        self.say(setup.choice.summary())
        # At the RTT the proxy starts with (0 ms): the precision ``auto`` keeps, measured on a first run.
        pick = await settle_precision(setup, with_draft(self.config, self.plan.model_path), self.say)
        label, taken = row.id, {d.label for d in self.result.devices}
        number = 2
        while label in taken:  # the same device asked for twice (e.g. "cpu" and its row id): keep both apart
            label, number = f"{row.id} #{number}", number + 1
        detail = {**setup.choice.to_json(), "draft_precision": pick.precision if pick else "",
                  "draft_precision_reason": pick.reason if pick else ""}
        return DeviceRun(requested, label, detail=detail), setup

    async def _warm_up(self, cloud: ClientSetup | None, edges: list[tuple[DeviceRun, ClientSetup]]) -> None:
        """One short answer per client, so first-call costs (allocations, kernel choice) stay out of the figures."""
        self.say("Warming up…")
        self._set_rtt(0.0)
        prompt = self.plan.prompts[0]
        settings = replace(self.plan.settings, max_new_tokens=min(8, self.plan.settings.max_new_tokens), seed=7)
        if cloud is not None:
            await cloud.client.chat(_conversation(prompt), settings)
        for _run, setup in edges:
            await setup.client.chat(_conversation(prompt), replace(settings, gamma=None, pipeline=True))
            if "edge-only" in self.plan.modes:
                await self._edge_only(setup, prompt, settings)

    # -- the main loop ------------------------------------------------------------------------------
    async def _measure_prompt(self, cloud: ClientSetup | None, edges: list[tuple[DeviceRun, ClientSetup]],
                              prompt: BenchPrompt, index: int, iteration: int, rtt: float) -> None:
        seed = answer_seed(self.plan.settings.seed, index, iteration)
        base = replace(self.plan.settings, seed=seed)
        edge = [m for m in self.plan.modes if m != BASELINE]  # cloud-only runs on a client of its own
        turn = (index + iteration) % max(1, len(edge))
        for mode in (*[m for m in self.plan.modes if m == BASELINE], *edge[turn:], *edge[:turn]):
            if mode == BASELINE:
                if cloud is not None:
                    await _forget_the_prompt(cloud, base)
                    answer = await cloud.client.chat(_conversation(prompt), base)
                    self._record("-", rtt, mode, prompt, iteration, seed, answer)
                continue
            for run, setup in edges:
                await _forget_the_prompt(setup, base)
                if mode == "edge-only":
                    answer = await self._edge_only(setup, prompt, base)
                else:
                    answer = await setup.client.chat(_conversation(prompt),
                                                     mode_settings(mode, base, self.plan.gamma))
                self._record(run.label, rtt, mode, prompt, iteration, seed, answer)

    async def _edge_only(self, setup: ClientSetup, prompt: BenchPrompt, settings: Settings) -> Answer:
        client = setup.client
        ids = client.prompt_ids(_conversation(prompt))
        return await generate_edge_only(client.drafter, setup.tokenizer, ids, settings,
                                        executor=client.drafter_executor)

    def _record(self, device: str, rtt: float, mode: str, prompt: BenchPrompt, iteration: int, seed: int,
                answer: Answer) -> None:
        stats = answer.stats.to_json()
        self.result.records.append(RunRecord(device=device, rtt_ms=rtt, mode=mode, prompt_id=prompt.id,
                                             category=prompt.category, iteration=iteration, seed=seed,
                                             stats=stats, token_ids=list(answer.token_ids),
                                             finish_reason=answer.finish_reason, text=answer.text[:300],
                                             prompt_set=prompt.prompt_set))
        self._done += 1
        self.say(f"[{self._done}/{self.plan.answers()}] rtt {rtt:g} ms · {mode:<14} · {device:<24} · "
                 f"{prompt.id} #{iteration + 1} in {answer.stats.total_ms / 1000:.2f} s: "
                 f"{stats_line(stats, answer.finish_reason)}")

    # -- concurrent sessions -----------------------------------------------------------------------
    async def _measure_sessions(self, run: DeviceRun, first: ClientSetup, setups: list[ClientSetup]) -> None:
        mode = "spec-pipelined" if "spec-pipelined" in self.plan.modes else "spec-adaptive"
        settings = mode_settings(mode, self.plan.settings, self.plan.gamma)
        pool = [first]
        for count in self.plan.sessions:
            while len(pool) < count:
                self.say(f"Loading edge client {len(pool) + 1} of {max(self.plan.sessions)} for the multi-session "
                         "figure…")
                extra = await self._build(run.requested if run.requested != "auto" else None)
                setups.append(extra)
                if extra.choice is None:
                    raise SpecdError(f"edge client {len(pool) + 1} could not load a drafter: {extra.drafter_error}")
                pool.append(extra)
            clients = pool[:count]
            prompts = [self.plan.prompts[i % len(self.plan.prompts)] for i in range(count)]
            start = time.perf_counter()
            answers = await asyncio.gather(*(
                c.client.chat(_conversation(p), replace(settings, seed=answer_seed(settings.seed, i, 0)))
                for i, (c, p) in enumerate(zip(clients, prompts, strict=True))))
            wall = time.perf_counter() - start
            record = SessionsRecord(
                sessions=count, mode=mode, rtt_ms=self.plan.rtts_ms[0], wall_s=wall,
                generated=sum(a.stats.generated for a in answers),
                verified=sum(a.stats.generated - a.stats.local_tokens for a in answers),
                per_session_tokens_per_second=[a.stats.tokens_per_second for a in answers])
            self.result.sessions.append(record)
            self.say(f"{count} concurrent session(s), {mode}: {record.verified} verified tokens in {wall:.2f} s = "
                     f"{record.total_verified_tokens_per_second:.1f} tok/s in total")


def _conversation(prompt: BenchPrompt) -> list[dict[str, str]]:
    return prompt.conversation()


_OTHER_QUESTION = [{"role": "user", "content": "Hello."}]


async def _forget_the_prompt(setup: ClientSetup, settings: Settings) -> None:
    """Let the client's verifier session and drafter hold another conversation, so that the next answer
    reads its prompt as a new question would, whichever mode or iteration read it last."""
    client = setup.client
    await client.chat(_OTHER_QUESTION, replace(settings, max_new_tokens=1))
    if client.drafter is not None:
        ids = client.prompt_ids(_OTHER_QUESTION)
        await client.in_drafter(lambda: client.drafter.prefill(ids))


async def _close(setup: ClientSetup) -> None:
    with contextlib.suppress(Exception):
        await setup.client.close()
    drafter = setup.client.drafter
    if drafter is not None:
        with contextlib.suppress(Exception):
            drafter.close()
