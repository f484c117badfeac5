"""End-to-end χ² harness: sampled answers through the shipped edge client and verifier follow the
target's own law.

A real verifier (by default the in-process ``Verifier`` on a real 127.0.0.1 socket) serves a tiny
target; real ``EdgeClient``s with a real drafter (torch, or ONNX Runtime GenAI built from the same tiny
draft) on a different tiny model answer thousands of seeded requests with a fixed γ ≥ 2 and at least
γ + 2 tokens each, so accepted drafts, corrections and bonus tokens all occur. Every position of the
answers is then tested against the target's exact conditionals (tests/target_law.py) and the
per-position p-values are combined with a Bonferroni correction::

    models = build_models(tmp_path)                      # target, draft, and its ORT GenAI build
    result = await run_case(Case("temperature-1", SamplingParams()), models)
    assert result.pvalue > alpha, result.summary()

Plug points, for every new path a token can take:

- ``verifier=``: an async context manager factory ``(target folder) -> url``. ``in_process_verifier``
  (the default) and ``subprocess_verifier`` (``python -m specd.daemon``) are here; a Ray-served
  verifier plugs in the same way.
- ``Case.sessions``: concurrent ``EdgeClient``s against one verifier (so a batching verifier batches);
  each session reuses its connection for all its answers.
- ``Case.pipeline``: drafting ahead on or off. ``Case.backend``: ``torch`` or ``onnxruntime-genai``.
- ``Case.context_proposer`` with a ``Case.prompt`` that repeats itself: rounds of drafts looked up in the
  conversation (q = 1 on each), alone or continued by the model.
- ``drive=``: how one answer is produced from a client (default ``client.generate``); it must return
  every token of the answer after the prompt. ``tests/mode_switches.py`` ``switching_answer`` switches
  between speculative rounds and the verifier streaming alone at seeded points, both ways.
- ``rule=``: the negative controls (tests/wrong_rules.py) replace the function the verifier calls to
  judge a round, through :func:`round_rule` — a test-only seam, in-process verifiers only.
- ``Case.trimmed``: the verifier's goodput budget verifies a seeded random prefix of every round's
  drafts (0 … γ, whatever the load), through :func:`trimmed_rounds` — the other test-only seam (the
  budget's choice, ``specd.daemon.engine.choose``), in-process verifiers only.

``python -m tests.lossless_harness`` (``make lossless``) runs the full-size cases and the negative
controls, repeated to measure power, and writes a Markdown report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from specd.daemon.server import Verifier
from specd.desktop.client.answer import Answer, Settings
from specd.desktop.client.connection import Endpoint
from specd.desktop.client.edge_client import EdgeClient
from specd.desktop.drafters.base import Drafter
from specd.shared.config import load_config
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.sampling import ProposalDistribution, SamplingParams, sparse_proposal
from tests.target_law import PositionTest, TargetLaw, bonferroni, conditional_tests, overlap
from tests.tiny_models import perturbed_llama, save_with_tokenizer, tiny_llama, tiny_ort_config

PROMPT = (1, 17, 42, 9)
EOS = frozenset({2})  # the tiny models' end-of-sequence
BACKENDS = ("torch", "onnxruntime-genai")
# A sharp target (entropy ~2.8 nats at temperature 1) makes a wrong rule's bias large next to sampling
# noise; the draft's weights are the target's plus noise of 0.5 times their spread.
TARGET_SHARPNESS = 16.0
DRAFT_NOISE = 0.5

# The function the verifier calls to judge one sampled round, with the proposal it validated on receipt:
# ``(draft_ids, ids, q, p, generator)``. A negative control swaps it for a wrong rule; if the verifier's
# round path moves, this is the one name to update.
VERIFIER_ROUND_RULE = "specd.daemon.rounds.verify_validated"

# The goodput budget's choice of each rounds forward's width, as the engine calls it; trimmed cases
# replace it with a seeded random width.
VERIFIER_BUDGET_CHOICE = "specd.daemon.engine.choose"

# What the last trimmed_rounds did: forwards chosen for, rounds trimmed, rounds cut to one target step.
TRIMS: Counter = Counter()

VerifierFactory = Callable[[Path], contextlib.AbstractAsyncContextManager[str]]
# One answer from a client: the answers it took (one, or several when it switches mode mid-answer);
# their tokens, in order, are the answer after the prompt.
AnswerDriver = Callable[[EdgeClient, list[int], Settings], Awaitable[list[Answer]]]


@dataclass(frozen=True, slots=True)
class Models:
    """The tiny pair on disk: the target, the draft, and the draft's ONNX Runtime GenAI build (or None)."""

    target: Path
    draft: Path
    draft_ort: Path | None


def build_models(root: Path, *, ort: bool = True) -> Models:
    """Write the tiny target and its draft (the target with noise added: overlap about 0.5 in every case
    below, so drafts are accepted, rejected and all accepted often); build the draft for ONNX Runtime
    GenAI too when ``ort`` and its builder is installed (a few seconds)."""
    model = tiny_llama(1, config=tiny_ort_config(), sharpness=TARGET_SHARPNESS)
    target = save_with_tokenizer(model, root / "target")
    draft = save_with_tokenizer(perturbed_llama(model, DRAFT_NOISE, seed=7), root / "draft")
    draft_ort = None
    if ort:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            pass
        else:
            from specd.desktop.drafters.convert import build_ortgenai

            draft_ort = root / "draft-ort"
            draft_ort.mkdir(exist_ok=True)
            build_ortgenai(draft, draft_ort, "fp32", lambda _msg: None)
    return Models(target=target, draft=draft, draft_ort=draft_ort)


def open_drafter(models: Models, backend: str) -> Drafter:
    if backend == "torch":
        from specd.desktop.drafters.torch_drafter import TorchDrafter

        return TorchDrafter(models.draft, "cpu")
    if backend == "onnxruntime-genai":
        from specd.desktop.drafters.ortgenai import OrtGenAIDrafter

        if models.draft_ort is None:
            raise RuntimeError("the ONNX Runtime GenAI draft was not built (onnxruntime-genai missing)")
        return OrtGenAIDrafter(models.draft_ort, max_length=64)
    raise ValueError(f"unknown drafter backend {backend!r}; one of {BACKENDS}")


# -- verifiers ----------------------------------------------------------------------------------

def verifier_overrides(target: Path) -> dict[str, Any]:
    """Loopback, a free port, the CPU, no API key, and no message rate limit (answers reuse connections)."""
    return {"server": {"host": "127.0.0.1", "port": 0, "device": "cpu", "api_key_env": ""},
            "models": {"target": str(target)}, "limits": {"max_messages_per_second": 0, "max_sessions": 64}}


@contextlib.asynccontextmanager
async def in_process_verifier(target: Path) -> AsyncIterator[str]:
    """The verifier's ``Verifier`` in this process, on a real socket; ``round_rule`` reaches it."""
    async with Verifier(load_config(None, verifier_overrides(target))) as verifier:
        yield verifier.url


@contextlib.asynccontextmanager
async def subprocess_verifier(target: Path) -> AsyncIterator[str]:
    """``python -m specd.daemon`` as a separate process (what systemd runs)."""
    from tests.daemon_process import DaemonProcess

    with tempfile.TemporaryDirectory(prefix="specd-lossless-") as workdir:
        daemon = DaemonProcess(target, Path(workdir), args=("--max-sessions", "64"),
                               config="[limits]\nmax_messages_per_second = 0\n")
        await daemon.astart()
        try:
            yield daemon.url
        finally:
            daemon.stop()


@contextlib.contextmanager
def round_rule(rule: Callable[..., Any] | None) -> Iterator[None]:
    """Make the in-process verifier judge rounds with ``rule``, a function with the signature of
    ``shared.sampling.verify_round`` (None: the shipped rule)."""
    if rule is None:
        yield
        return
    def judged_by_rule(draft_ids: torch.Tensor, ids: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                       generator: torch.Generator | None = None) -> Any:
        return rule(draft_ids, ProposalDistribution(ids=ids, probs=q), p, generator)

    with mock.patch(VERIFIER_ROUND_RULE, judged_by_rule):
        yield


@contextlib.contextmanager
def trimmed_rounds(seed: int | None) -> Iterator[None]:
    """Make the in-process verifier's goodput budget verify a random prefix of each forward's rounds:
    the forward's width is drawn from 1 … γ + 1 (``random.Random(seed)``), so rounds are judged with
    every γ' ≤ γ, none included (a cloud step). None: the shipped budget."""
    if seed is None:
        yield
        return
    from specd.daemon.goodput import Choice

    draw = random.Random(seed)
    TRIMS.clear()

    def random_width(offers: Any, _cost: Any, *, max_rows: int, max_positions: int, idle_s: float = 0.0) -> Choice:
        width = draw.randint(1, max(o.drafts for o in offers) + 1)
        TRIMS["forwards"] += 1
        TRIMS["rounds trimmed"] += sum(o.drafts > width - 1 for o in offers)
        TRIMS["rounds to one step"] += sum(o.drafts > 0 for o in offers) if width == 1 else 0
        return Choice(width=width, rows=max(1, min(len(offers), max_rows, max_positions // width)), goodput=0.0)

    with mock.patch(VERIFIER_BUDGET_CHOICE, random_width):
        yield


# -- answers ------------------------------------------------------------------------------------

async def speculative_answer(client: EdgeClient, prompt: list[int], settings: Settings) -> list[Answer]:
    """One answer as the product gives it: ``EdgeClient.generate``, speculative all along."""
    return [await client.generate(prompt, settings)]


def _check_answer(answer: Answer) -> None:
    """Every token came from the verifier (no local fallback) and the answer ran to its end."""
    if (answer.stats.mode not in ("speculative", "cloud-only") or answer.stats.local_tokens
            or answer.finish_reason not in ("length", "eos")):
        raise AssertionError(f"an answer did not run through the verifier to its end: mode "
                             f"{answer.stats.mode}, finish {answer.finish_reason}")


@dataclass(frozen=True, slots=True)
class Case:
    """One configuration: sampling settings, fixed γ, the tokens tested per answer, and how it runs."""

    name: str
    sampling: SamplingParams
    gamma: int = 2
    tokens: int = 4
    pipeline: bool = True
    backend: str = "torch"
    support_k: int = 64
    answers: int = 2000
    sessions: int = 2
    first_seed: int = 0
    trimmed: bool = False  # the verifier verifies a random prefix of each round (trimmed_rounds)
    context_proposer: bool = False  # also draft from the conversation (looked-up and mixed rounds)
    prompt: tuple[int, ...] = PROMPT

    def __post_init__(self) -> None:
        if self.gamma < 2 or self.tokens < self.gamma + 2:
            raise ValueError(f"{self.name}: need γ ≥ 2 and tokens ≥ γ + 2 (got γ {self.gamma}, "
                             f"tokens {self.tokens}) so accepted, corrected and bonus tokens all occur")

    def settings(self, seed: int) -> Settings:
        return Settings(sampling=self.sampling, max_new_tokens=self.tokens, seed=seed, gamma=self.gamma,
                        gamma_max=self.gamma, support_k=self.support_k, pipeline=self.pipeline,
                        context_proposer=self.context_proposer)


@dataclass(slots=True)
class Sample:
    answers: list[list[int]]
    seconds: float
    kinds: Counter = field(default_factory=Counter)  # accepted / corrected / bonus tokens, ahead rounds

    @property
    def answers_per_second(self) -> float:
        return len(self.answers) / self.seconds if self.seconds > 0 else 0.0


def _tally(answer: Answer, kinds: Counter) -> None:
    """Count accepted drafts, corrections and bonus tokens from the answer's pieces and round sizes."""
    gammas = iter(answer.stats.gammas)
    drafts = 0
    for piece in answer.pieces:
        if piece.source == "draft":
            drafts += len(piece.token_ids)
        elif piece.source == "target" and piece.token_ids:
            gamma = next(gammas, None)
            kinds["accepted"] += drafts
            kinds["bonus" if gamma is not None and drafts >= gamma else "corrected"] += len(piece.token_ids)
            drafts = 0
        elif piece.source == "cloud":
            kinds["streamed"] += len(piece.token_ids)
    kinds["rounds"] += answer.stats.rounds
    kinds["looked-up drafts"] += answer.stats.proposed_by_source["context"]
    kinds["model drafts"] += answer.stats.proposed_by_source["model"]
    kinds["looked-ahead drafts"] += answer.stats.looked_ahead_drafts
    kinds["ahead rounds"] += answer.stats.ahead_rounds


def make_client(url: str, models: Models, backend: str) -> EdgeClient:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models.draft))
    return EdgeClient(Endpoint(url=url, open_timeout=30), tokenizer=tokenizer,
                      fingerprint=tokenizer_fingerprint(tokenizer), drafter=open_drafter(models, backend),
                      on_disconnect="stop")


async def sample_answers(url: str, models: Models, case: Case, drive: AnswerDriver = speculative_answer,
                         prompt: tuple[int, ...] | None = None) -> Sample:
    """``case.answers`` answers with seeds ``first_seed …``, spread over ``case.sessions`` clients."""
    prompt = prompt or case.prompt
    clients = [make_client(url, models, case.backend) for _ in range(case.sessions)]
    answers: dict[int, list[int]] = {}
    kinds: Counter = Counter()

    async def session(client: EdgeClient, seeds: range) -> None:
        for seed in seeds:
            parts = await drive(client, list(prompt), case.settings(seed))
            for part in parts:
                _check_answer(part)
                _tally(part, kinds)
            answers[seed] = [t for part in parts for t in part.token_ids]

    seeds = range(case.first_seed, case.first_seed + case.answers)
    start = time.perf_counter()
    try:
        await asyncio.gather(*(session(c, seeds[k::case.sessions]) for k, c in enumerate(clients)))
    finally:
        for client in clients:
            await client.close()
            client.drafter.close()
    return Sample(answers=[answers[s] for s in seeds], seconds=time.perf_counter() - start, kinds=kinds)


# -- the test -----------------------------------------------------------------------------------

@dataclass(slots=True)
class CaseResult:
    case: Case
    positions: list[PositionTest]
    sample: Sample
    overlap: float  # Σ min(p, q) at the prompt, under the case's sampling settings

    @property
    def pvalue(self) -> float:
        """Bonferroni over the positions: the case's p-value."""
        return bonferroni([t.pvalue for t in self.positions])

    def summary(self) -> str:
        per = ", ".join(f"t{t.position} {t.kind} {t.pvalue:.3g} (χ² {t.statistic:.0f}/{t.df})"
                        for t in self.positions)
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.sample.kinds.items()))
        return (f"{self.case.name}: p = {self.pvalue:.3g} [{per}]; overlap {self.overlap:.2f}; {kinds}; "
                f"{len(self.sample.answers)} answers in {self.sample.seconds:.1f} s "
                f"({self.sample.answers_per_second:.0f}/s)")


_LAWS: dict[tuple[Path, SamplingParams, tuple[int, ...]], TargetLaw] = {}


def target_law(folder: Path, params: SamplingParams, prompt: tuple[int, ...] = PROMPT) -> TargetLaw:
    """The exact law of the target in ``folder`` (cached: cases with the same settings share it)."""
    key = (folder, params, prompt)
    if key not in _LAWS:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        _LAWS[key] = TargetLaw(model, prompt, params)
    return _LAWS[key]


@torch.inference_mode()
def prompt_overlap(models: Models, case: Case, prompt: tuple[int, ...] = PROMPT) -> float:
    """Σ min(p, q) at the prompt: p the target's law, q the draft's sparse proposal."""
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(str(models.draft), dtype=torch.float32).eval()
    logits = draft(torch.tensor([prompt])).logits[:, -1]
    proposal = sparse_proposal(logits, case.sampling, case.support_k)
    q = torch.zeros(logits.shape[-1], dtype=torch.float64).scatter_(0, proposal.ids[0], proposal.probs[0].double())
    return overlap(target_law(models.target, case.sampling, prompt).first(), q)


async def run_case(case: Case, models: Models, *, verifier: VerifierFactory = in_process_verifier,
                   drive: AnswerDriver = speculative_answer, rule: Callable[..., Any] | None = None,
                   prompt: tuple[int, ...] | None = None) -> CaseResult:
    """Sample ``case`` through a verifier from ``verifier`` (judging rounds with ``rule`` when given)
    and test every position of the answers against the target's exact law."""
    prompt = prompt or case.prompt
    if (rule is not None or case.trimmed) and verifier is not in_process_verifier:
        raise ValueError("a wrong rule or trimmed rounds reach only the in-process verifier (they patch this "
                         "process)")
    with round_rule(rule), trimmed_rounds(case.first_seed if case.trimmed else None):
        async with verifier(models.target) as url:
            sample = await sample_answers(url, models, case, drive, prompt)
    law = target_law(models.target, case.sampling, prompt)
    positions = await asyncio.to_thread(conditional_tests, sample.answers, law, case.tokens, eos=EOS)
    return CaseResult(case=case, positions=positions, sample=sample, overlap=prompt_overlap(models, case, prompt))


def default_threads() -> None:
    """One torch thread: tiny models gain nothing from more, and the machine is shared."""
    torch.set_num_threads(int(os.environ.get("SPECD_TEST_THREADS", "1")))
