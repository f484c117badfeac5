"""``[models] draft_precision = "auto"``: build the candidate drafts, measure them against the verifier, keep
the fastest and record why.

The loader opens the draft at the recorded choice, or at the per-device default when none exists
(:func:`specd.desktop.precision.choice.pick_precision`); :func:`settle_precision` runs once the verifier
is known. When the record holds for this draft, device and the verifier's target, nothing is built or
measured. Otherwise every candidate is built (cached like any draft), answers :data:`MEASURE_PROMPTS`
speculatively against the verifier, and is ranked by the γ controller's expected tokens per second at the
measured round trip (:mod:`specd.desktop.precision.ranking`); the client then drafts with the
winner. Each measuring answer is an ordinary ``EdgeClient.generate`` on a connection of its own, whose γ
controller records the rounds. Without a reachable verifier the default stays and the measurement waits
for the next time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import replace
from typing import Protocol

import msgspec

from specd.desktop.client.adaptive import EstimatePriors
from specd.desktop.client.answer import Settings
from specd.desktop.client.connection import ConnectionFailed, Disconnected
from specd.desktop.client.edge_client import EdgeClient
from specd.desktop.drafters import Drafter, open_drafter
from specd.desktop.drafters.devices import DeviceChoice, DeviceRow
from specd.desktop.precision.choice import (
    AUTO,
    PrecisionPick,
    candidates,
    pick_precision,
    read_record,
    record_identity,
    record_matches,
    record_path,
    record_target,
    write_record,
)
from specd.desktop.precision.ranking import (
    CandidateFigures,
    MeasuredRound,
    RankedCandidate,
    RecordingController,
    rank_candidates,
)
from specd.shared.config import Config
from specd.shared.errors import RemoteError, SpecdError
from specd.shared.models import Progress

# Few and short: building and measuring the candidates is part of a first start.
MEASURE_PROMPTS = (
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that adds two numbers.",
    "Give me three tips for sleeping well.",
)
MEASURE_TOKENS = 32
MEASURE_SEED = 4321


class ClientSetup(Protocol):
    """What settling the precision needs of a client being set up (``commands.launch.ClientSetup`` is one)."""

    client: EdgeClient
    choice: DeviceChoice | None  # None: cloud-only (no drafter)


async def settle_precision(setup: ClientSetup, config: Config,
                           progress: Progress | None = None) -> PrecisionPick | None:
    """Make ``setup``'s draft the precision ``auto`` chooses (measuring when needed), say which and why,
    and return it; None for a cloud-only setup."""
    say = progress or (lambda _msg: None)
    client, choice = setup.client, setup.choice
    drafter = client.drafter
    if choice is None or drafter is None:
        return None
    row = choice.row
    choices = candidates(row, config)
    loaded = replace(pick_precision(row, config, read_only=True), precision=drafter.precision,
                     reason=drafter.precision_reason)  # how the loader picked what it opened
    if config.models.draft_precision != AUTO or len(choices) < 2:
        say(f"Draft precision: {loaded.reason}")
        return loaded
    try:
        welcome = client.welcome if client.connected and client.welcome else await client.connect()
    except (ConnectionFailed, RemoteError) as exc:
        later = ("checked against its target" if loaded.source == "measured" else "measured")
        say(f"Draft precision: {loaded.reason}; the verifier is not reachable ({exc}), so the choice is "
            f"{later} the next time it is")
        return loaded
    target = record_target(welcome.model, welcome.tokenizer)
    path = record_path(row, config)
    record = read_record(path, say)
    if record is not None and record_matches(record, row, config, choices):
        if record["target"] == target and record["precision"] == drafter.precision:
            say(f"Draft precision: {record['reason']} (measured before, recorded in {path})")
            client.estimate_priors = EstimatePriors.from_record(record)  # what it measured seeds the estimates
            return PrecisionPick(record["precision"], record["reason"], "measured")
        if record["target"] != target:
            say(f"{path} was measured against {record['target']}; measuring again against {target}")
    started = time.perf_counter()
    measured = await _measure(client, row, config, choices, welcome.model, say)
    if measured is None:
        return PrecisionPick(client.drafter.precision, client.drafter.precision_reason, "default")
    ranked, reason, failed = measured
    record = {"precision": ranked[0].precision, "reason": reason, "target": target, **record_identity(row, config),
              "measured_at": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "prompts": len(MEASURE_PROMPTS), "max_new_tokens": MEASURE_TOKENS,
              "candidates": [c.to_json() for c in ranked], "failed": failed}
    write_record(path, record)
    client.estimate_priors = EstimatePriors.from_record(record)
    say(f"Draft precision: {reason} (chosen in {time.perf_counter() - started:.0f} s, recorded in {path})")
    return PrecisionPick(ranked[0].precision, reason, "measured")


async def _measure(client: EdgeClient, row: DeviceRow, config: Config, choices: tuple[str, ...], target: str,
                   say: Progress) -> tuple[list[RankedCandidate], str, dict[str, str]] | None:
    """Build, measure and rank every candidate; the client keeps the winner's drafter. None when the
    verifier went away meanwhile (the client keeps the draft it had)."""
    assert client.drafter is not None
    settings = measure_settings(config)
    say(f"Choosing the draft precision on {row.name}: measuring {', '.join(choices)} against the verifier "
        f"({len(MEASURE_PROMPTS)} short prompts each)…")
    drafters: dict[str, Drafter] = {client.drafter.precision: client.drafter}
    figures: list[CandidateFigures] = []
    failed: dict[str, str] = {}
    try:
        for precision in choices:
            try:
                if precision not in drafters:
                    say(f"  building the {precision} draft…")
                    drafters[precision] = await asyncio.to_thread(_open_candidate, row, config, precision, say)
                rounds = await measure_candidate(client, drafters[precision], settings)
            except Disconnected:
                raise
            except (SpecdError, ImportError, RuntimeError, OSError, MemoryError) as exc:
                failed[precision] = str(exc)
                say(f"  {precision} cannot run here: {exc}")
                continue
            figure = CandidateFigures(precision, rounds)
            figures.append(figure)
            say(f"  measuring {precision}: acceptance {figure.acceptance:.2f}, "
                f"{figure.draft_ms_per_token:.1f} ms/token ({len(rounds)} rounds)")
    except Disconnected as exc:
        say(f"  the verifier went away while measuring ({exc}); keeping {client.drafter.precision} for now")
        _close_all(drafters, keep=client.drafter)
        return None
    ranked = rank_candidates(figures, settings.gamma_max)
    if not ranked:
        say(f"  no candidate could be measured; keeping {client.drafter.precision}")
        _close_all(drafters, keep=client.drafter)
        return None
    reason = choice_reason(ranked, row.name, target)
    winner = drafters[ranked[0].precision]
    winner.precision, winner.precision_reason = ranked[0].precision, reason
    client.drafter = winner
    _close_all(drafters, keep=winner)
    return ranked, reason, failed


def choice_reason(ranked: list[RankedCandidate], device: str, target: str) -> str:
    """Why the first of ``ranked`` was kept, with every candidate's figures."""
    best, others = ranked[0], ranked[1:]
    text = f"{best.precision}, measured fastest on {device}: {best.describe()}"
    if others:
        text += " against " + "; ".join(other.describe() for other in others)
    return text + f", expected at the measured {best.network_ms:.1f} ms round trip to {target}"


def measure_settings(config: Config) -> Settings:
    """The config's sampling, short answers, adaptive γ; no drafting ahead (plain rounds time the network) and
    no stretches streamed by the verifier alone (every token of a measuring answer is a verified round)."""
    return replace(Settings.from_config(config), max_new_tokens=MEASURE_TOKENS, seed=MEASURE_SEED, gamma=None,
                   pipeline=False, mode_switching=False)


async def measure_candidate(client: EdgeClient, drafter: Drafter, settings: Settings) -> tuple[MeasuredRound, ...]:
    """Every round of :data:`MEASURE_PROMPTS` answered speculatively with ``drafter`` on a connection of its
    own to ``client``'s verifier, as its γ controller observed them."""
    controller = RecordingController(settings.gamma_max)  # one across the prompts: γ keeps what it learnt
    probe = EdgeClient(client.endpoint, tokenizer=client.tokenizer, fingerprint=client.fingerprint, drafter=drafter,
                       on_disconnect="stop", estimates=controller)
    try:
        for number, prompt in enumerate(MEASURE_PROMPTS):
            seed = settings.seed + number if settings.seed is not None else number
            answer = await probe.chat([{"role": "user", "content": prompt}], replace(settings, seed=seed))
            if answer.finish_reason == "disconnected":
                raise Disconnected(f"the verifier at {client.endpoint.display} went away")
    except ConnectionFailed as exc:
        raise Disconnected(str(exc)) from None
    finally:
        await probe.close()
    # The very first round carries one-off costs (a fresh draft's first forward passes, the session's first
    # request), not what every later round costs.
    return tuple(controller.rounds[1:])


def _open_candidate(row: DeviceRow, config: Config, precision: str, say: Progress) -> Drafter:
    catalog = None
    if row.backend == "onnxruntime-genai" and row.device != "cpu":
        from specd.desktop.drafters.winml import default_catalog

        catalog, _why = default_catalog()
    models = msgspec.structs.replace(config.models, draft_precision=precision)
    return open_drafter(row, msgspec.structs.replace(config, models=models), say, catalog=catalog)


def _close_all(drafters: dict[str, Drafter], *, keep: Drafter) -> None:
    for drafter in drafters.values():
        if drafter is not keep:
            drafter.close()
