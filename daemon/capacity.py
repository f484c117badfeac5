"""Capacity planning: verified tokens/s and round latency against concurrent sessions, on the engine itself.

Each simulated session replays draft rounds recorded from the real draft model (``--drafts int4``:
daemon/draft_rounds.json, ``int8``: daemon/draft_rounds_int8.json, both made by
benchmarks/record_draft_rounds.py): the drafts a laptop sent and how many of them the target accepted.
A replay at γ sends the first γ drafts of each recorded round and counts ``min(accepted, verified) + 1``
new tokens, so acceptance is the real draft's and the edge costs nothing. With the goodput budget the
engine verifies a prefix of each round (``verified``) and the replay sends, next, the γ the verdict
suggests (at most the recorded γ); without it every draft of a fixed γ is verified. Cloud-only sessions
run one target step per token. Both go through the same batched :class:`~specd.daemon.engine.Engine` the daemon
serves with (no sockets: the figures are the verifier's own); ``one_session_per_forward`` measures the
unbatched engine beside it.

A cell measures N sessions busy from start to end, as a server with N users is: a session that has its
tokens goes on with its user's next request (the same prompt, whose KV it keeps: no prefill) until every
session has them. Sessions that stopped at their tokens would end a cell with a tail of forwards over a
few sessions, and speculative rounds, which yield unevenly, make that tail longer than cloud-only's
lockstep does (at 32 sessions a fixed γ averaged 26 of 32 rows a forward, cloud-only 32).
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from specd.daemon.engine import Engine, EngineLimits, ForwardStats
from specd.daemon.goodput import Acceptance, ForwardCost
from specd.daemon.rounds import RoundDrafts, cloud_token, round_verdict
from specd.daemon.target import TargetModel
from specd.shared.errors import ConfigError
from specd.shared.sampling import SamplingParams

# Recorded rounds shipped with specd: int4 (the weaker draft, closer to a 1B → 8B pair's acceptance) and
# int8 (what the draft precision `auto` picks on a 2-core x86 CPU).
RECORDINGS = {"int4": Path(__file__).with_name("draft_rounds.json"),
              "int8": Path(__file__).with_name("draft_rounds_int8.json")}
DEFAULT_RECORDING = RECORDINGS["int4"]
GREEDY = SamplingParams(temperature=0.0)

# Architectures an operator can plan for without downloading weights (their published configs).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
}


@dataclass(frozen=True, slots=True)
class RecordedRound:
    drafts: list[int]
    accepted: int


@dataclass(frozen=True, slots=True)
class RecordedSession:
    prompt: list[int]
    rounds: list[RecordedRound]


def load_recording(path: Path) -> tuple[dict[str, Any], list[RecordedSession]]:
    """The recording's description and its sessions; a missing or malformed file is a ConfigError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        sessions = [RecordedSession(prompt=list(s["prompt"]),
                                    rounds=[RecordedRound(list(r["drafts"]), int(r["accepted"])) for r in s["rounds"]])
                    for s in data["sessions"]]
    except OSError as exc:
        raise ConfigError(f"--recording {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--recording {path}: not a draft-round recording ({exc})") from None
    if not sessions or not all(s.rounds for s in sessions):
        raise ConfigError(f"--recording {path}: no recorded rounds")
    meta = {k: v for k, v in data.items() if k != "sessions"}
    return meta, sessions


def random_target(shape: str, device: torch.device, dtype: torch.dtype) -> TargetModel:
    """A randomly initialised model of a published architecture, built directly on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    return TargetModel(model, None, name=f"{shape} (random weights)", device=device, dtype=dtype)


@dataclass(frozen=True, slots=True)
class Cell:
    """The figures of one mode at one number of sessions and one γ."""

    mode: str
    batched: bool
    sessions: int
    gamma: int  # drafts per round; with the budget, the most a round offers
    tokens: int
    wall_s: float
    aggregate_tps: float  # generated tokens per second, all sessions together
    per_user_tps: float  # the mean session's tokens per second
    p50_ms: float  # round latency: one verify (speculative) or one step (cloud)
    p99_ms: float
    device_s_per_1k: float  # seconds of target forwards per 1000 generated tokens
    acceptance: float | None
    forwards: int
    mean_batch: float  # sessions per forward
    budget: bool = False  # the goodput budget chose each forward's verified drafts
    verified_gamma: float | None = None  # mean drafts verified per round
    mean_width: float = 0.0  # positions per row of a forward (rows are padded to the widest)
    rounds: int = 0  # rounds (speculative) or steps (cloud) timed
    repeats: int = 1  # measurements combined into this cell (``combine``)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def combine(parts: list[Cell]) -> Cell:
    """One cell from repeats of the same mode, N and γ measured in turn with the others (``--repeat``):
    tokens and seconds summed, so a burst of load elsewhere weighs as long as it lasted; acceptance,
    verified drafts, width and batch weighted by what they count; p50 the median of the repeats' p50 and
    p99 the worst repeat's."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    tokens, wall = sum(c.tokens for c in parts), sum(c.wall_s for c in parts)
    rounds, forwards = sum(c.rounds for c in parts), sum(c.forwards for c in parts)
    drafted = [(c.verified_gamma or 0.0) * c.rounds for c in parts]
    accepted = sum((c.acceptance or 0.0) * d for c, d in zip(parts, drafted, strict=True))
    return Cell(mode=first.mode, batched=first.batched, sessions=first.sessions, gamma=first.gamma,
                tokens=tokens, wall_s=round(wall, 4), aggregate_tps=round(tokens / wall, 3),
                per_user_tps=round(sum(c.per_user_tps * c.wall_s for c in parts) / wall, 3),
                p50_ms=round(statistics.median(c.p50_ms for c in parts), 3), p99_ms=max(c.p99_ms for c in parts),
                device_s_per_1k=round(sum(c.device_s_per_1k * c.tokens for c in parts) / tokens, 4),
                acceptance=round(accepted / sum(drafted), 4) if sum(drafted) else None, forwards=forwards,
                mean_batch=round(sum(c.mean_batch * c.forwards for c in parts) / forwards, 3) if forwards else 0.0,
                budget=first.budget,
                verified_gamma=round(sum(drafted) / rounds, 3) if first.verified_gamma is not None and rounds else None,
                mean_width=round(sum(c.mean_width * c.forwards for c in parts) / forwards, 3) if forwards else 0.0,
                rounds=rounds, repeats=sum(c.repeats for c in parts))


@dataclass(slots=True)
class _Quota:
    """How many of a cell's sessions still lack their tokens; the others keep generating meanwhile."""

    short: int

    async def busy(self, generated: int, tokens: int, counted: bool) -> tuple[bool, bool]:
        """Whether a session that has ``generated`` tokens goes on, and whether its quota is counted. It
        yields once first, so every session the same forward answered counts before any goes on: the cell
        ends with that forward, not with one more over the sessions that went on first."""
        if generated >= tokens and not counted:
            self.short -= 1
            counted = True
        await asyncio.sleep(0)
        return self.short > 0, counted


async def _speculative(engine: Engine, rec: RecordedSession, gamma: int, tokens: int, latencies: list[float],
                       start: asyncio.Event, quota: _Quota) -> tuple[int, int, int, float]:
    """Rounds of ``gamma`` drafts; under the budget, of the γ the last verdict suggested (≤ ``gamma``), until
    every session of the cell has ``tokens``. Returns tokens generated, drafts verified, drafts accepted and
    the seconds it took."""
    session = engine.open()
    committed = list(rec.prompt)
    await engine.prefill(session, committed, 0)
    await start.wait()
    began = time.monotonic()
    generated = drafted = accepted = 0
    index, counted, busy = 0, False, True
    while busy:
        recorded = rec.rounds[index % len(rec.rounds)]
        index += 1
        offered = min(gamma, session.suggested_gamma or gamma)
        drafts = (recorded.drafts * offered)[:offered]  # a short recorded round (end of answer) is repeated
        t0 = time.monotonic()
        judged, _q, _r = await engine.run(
            session, committed[:-1], [committed[-1], *drafts],
            round_verdict(RoundDrafts(torch.tensor(drafts)), GREEDY, 0, len(committed)), drafts=offered)
        latencies.append(time.monotonic() - t0)
        keep = min(recorded.accepted, judged.verified)
        session.acceptance.observe(judged.verified, keep)
        committed += [*drafts[:keep], drafts[keep] if keep < offered else drafts[-1]]
        generated += keep + 1
        drafted += judged.verified
        accepted += keep
        busy, counted = await quota.busy(generated, tokens, counted)
        if len(committed) - len(rec.prompt) >= tokens:
            committed = list(rec.prompt)  # the next request: the KV past the prompt is rolled back
    wall = time.monotonic() - began
    engine.close(session)
    return generated, drafted, accepted, wall


async def _cloud(engine: Engine, rec: RecordedSession, tokens: int, latencies: list[float],
                 start: asyncio.Event, quota: _Quota) -> tuple[int, int, int, float]:
    session = engine.open()
    committed = list(rec.prompt)
    await engine.prefill(session, committed, 0)
    await start.wait()
    began = time.monotonic()
    generated, counted, busy = 0, False, True
    while busy:
        t0 = time.monotonic()
        (token, _p), _q, _r = await engine.run(session, committed[:-1], [committed[-1]],
                                               cloud_token(GREEDY, 0, len(committed)))
        latencies.append(time.monotonic() - t0)
        committed.append(token)
        generated += 1
        busy, counted = await quota.busy(generated, tokens, counted)
        if len(committed) - len(rec.prompt) >= tokens:
            committed = list(rec.prompt)
    wall = time.monotonic() - began
    engine.close(session)
    return generated, 0, 0, wall


async def measure(target: TargetModel, recording: list[RecordedSession], *, mode: str, batched: bool,
                  sessions: int, gamma: int, tokens: int, max_batch_tokens: int,
                  executor: ThreadPoolExecutor, budget: bool = False, cost: ForwardCost | None = None,
                  population: Acceptance | None = None) -> Cell:
    """``sessions`` concurrent sessions of ``mode`` (speculative or cloud), busy until each has ``tokens``;
    ``budget``: speculative rounds under the goodput budget (``cost``: the forward-cost model to start from;
    ``population``: the acceptance of the rounds judged before, which this cell's rounds join)."""
    longest = max(len(r.prompt) for r in recording)
    budget = budget and mode == "speculative"
    limits = EngineLimits(max_sessions=sessions, slot_len=longest + tokens + 2 * gamma + 2,
                          max_batch_tokens=max_batch_tokens, one_session_per_forward=not batched,
                          goodput_budget=budget, max_draft=gamma)
    engine = await asyncio.get_running_loop().run_in_executor(executor, Engine.create, target, limits, executor,
                                                              cost, population)
    if engine.capacity < sessions:
        raise ConfigError(f"the KV memory holds {engine.capacity} of {sessions} sessions on {target.device}")
    stats: list[ForwardStats] = []
    latencies: list[float] = []
    start = asyncio.Event()
    picks = [recording[i % len(recording)] for i in range(sessions)]
    quota = _Quota(short=sessions)
    runs = [_speculative(engine, rec, gamma, tokens, latencies, start, quota) if mode == "speculative"
            else _cloud(engine, rec, tokens, latencies, start, quota) for rec in picks]
    tasks = [asyncio.create_task(run) for run in runs]
    while engine.open_sessions < sessions or engine.pending or engine.busy:  # every prefill done
        await asyncio.sleep(0.01)
    engine.on_forward = stats.append
    began = time.monotonic()
    start.set()
    results = await asyncio.gather(*tasks)
    wall = time.monotonic() - began
    await engine.close_all()
    del engine
    gc.collect()
    if target.device.type == "cuda":
        torch.cuda.empty_cache()
    generated = sum(r[0] for r in results)
    drafted, accepted = sum(r[1] for r in results), sum(r[2] for r in results)
    ordered = sorted(latencies)
    return Cell(mode=mode, batched=batched, sessions=sessions, gamma=gamma if mode == "speculative" else 0,
                tokens=generated, wall_s=round(wall, 4), aggregate_tps=round(generated / wall, 3),
                per_user_tps=round(statistics.fmean(r[0] / r[3] for r in results), 3),
                p50_ms=round(_quantile(ordered, 0.50) * 1000, 3), p99_ms=round(_quantile(ordered, 0.99) * 1000, 3),
                device_s_per_1k=round(sum(s.seconds for s in stats) / generated * 1000, 4),
                acceptance=round(accepted / drafted, 4) if drafted else None, forwards=len(stats),
                mean_batch=round(statistics.fmean(s.sessions for s in stats), 3) if stats else 0.0,
                budget=budget, verified_gamma=round(drafted / len(latencies), 3) if mode == "speculative" else None,
                mean_width=round(statistics.fmean(s.width for s in stats), 3) if stats else 0.0,
                rounds=len(latencies))


async def calibrated_cost(target: TargetModel, *, sessions: int, max_batch_tokens: int, gamma: int,
                          executor: ThreadPoolExecutor) -> ForwardCost:
    """A forward-cost model calibrated once for every budget cell (an engine of ``sessions`` slots)."""
    limits = EngineLimits(max_sessions=sessions, slot_len=gamma + 2, max_batch_tokens=max_batch_tokens,
                          goodput_budget=True, max_draft=gamma)
    engine = await asyncio.get_running_loop().run_in_executor(executor, Engine.create, target, limits, executor)
    cost = engine.cost
    await engine.close_all()
    del engine
    gc.collect()
    return cost


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
