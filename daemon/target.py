"""The target model: loading, per-session KV caches, and the forwards a session needs.

All model work runs on ONE worker thread (:class:`ModelWorker`), so the event loop keeps answering
pings and other sessions while a forward runs; jobs from different sessions are taken round-robin, so
a session streaming in cloud mode cannot starve a speculative one. Each session owns a
:class:`SessionCache` that holds the KV of its committed sequence minus the last token: a draft round
is then exactly one forward over ``[parent] + drafts``, and the prefix is never recomputed
(``TargetModel.forward_positions`` records how many positions each forward processed, for tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from specd.shared import messages as m
from specd.shared.config import Config
from specd.shared.errors import ConfigError, ModelError
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.hf_models import cache_kwarg, cuda_problem, drop_last, model_eos_ids
from specd.shared.models import ensure_hf_folder, resolve_source
from specd.shared.protocol.codec import common_prefix
from specd.shared.sampling import (
    CLOUD_STREAM,
    VERIFY_STREAM,
    RoundResult,
    SamplingParams,
    decode_proposal,
    position_generator,
    sample,
    target_probs,
    validate_proposal,
    verify_greedy,
    verify_validated,
)

log = logging.getLogger("specd.daemon.target")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA GPU when there is one, else the CPU; ``cuda:N`` must exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    problem = cuda_problem(dev)
    if problem is not None:
        raise ConfigError(f"--device {device}: {problem}; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on the CPU (where half-precision matmuls are slow)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


class TargetModel:
    """A causal LM loaded for verification; every method but :meth:`load` runs on the worker thread."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.name = name
        self.device = device
        self.dtype = dtype
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos = model_eos_ids(model, tokenizer)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self._cache_kwarg = cache_kwarg(model)
        # Positions processed by each forward (most recent last), and running totals.
        self.forward_positions: deque[int] = deque(maxlen=4096)
        self.forwards_total = 0
        self.positions_total = 0

    @classmethod
    def load(cls, config: Config, progress: Callable[[str], None] | None = None) -> TargetModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        say = progress or (lambda _msg: None)
        spec = config.models.target
        source = resolve_source(spec)
        device = resolve_device(config.server.device)
        dtype = resolve_dtype(config.server.dtype, device)
        if not sys.stderr or not sys.stderr.isatty():
            from transformers.utils import logging as hf_logging

            # No bars in journald, log files or the pipe `specd demo` relays (even while preparing).
            hf_logging.disable_progress_bar()
        folder = ensure_hf_folder(source, cache_override=config.models.cache_dir, progress=say)
        say(f"Loading {spec} on {device} ({str(dtype).removeprefix('torch.')})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
            model = model.to(device).eval()
        except torch.cuda.OutOfMemoryError:
            raise ModelError(f"not enough GPU memory on {device} for {spec}; pick a smaller model or "
                             "--dtype bfloat16") from None
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot load the target model from {folder}: {exc}") from None
        name = source.name if source.kind in ("folder", "gguf") else source.ref
        return cls(model, tokenizer, name=name, device=device, dtype=dtype)

    @torch.inference_mode()
    def forward(self, cache: Any, ids: list[int], *, last_only: bool = False) -> torch.Tensor:
        """Run ``ids`` after what ``cache`` holds (extending it); float32 logits ``[n or 1, V]``."""
        tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=tensor, use_cache=True, logits_to_keep=1 if last_only else 0,
                         **{self._cache_kwarg: cache})
        self.forward_positions.append(len(ids))
        self.forwards_total += 1
        self.positions_total += len(ids)
        return out.logits[0].float()

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(slots=True)
class SessionCache:
    """One session's KV cache and the tokens it holds, position for position."""

    target: TargetModel
    tokens: list[int] = field(default_factory=list)
    kv: Any = None

    def sync(self, prefix: list[int]) -> int:
        """Make the cache hold exactly ``prefix``: keep the common part, compute the rest.

        Returns how many positions were already there. In normal operation the cache already holds
        ``prefix`` (or ``prefix`` plus rejected drafts to crop), and nothing is recomputed.
        """
        keep = common_prefix(self.tokens, prefix)
        self.crop(keep)
        if len(prefix) > keep:
            self.target.forward(self._kv(), prefix[keep:], last_only=True)
            self.tokens = list(prefix)
        return keep

    def extend(self, ids: list[int], *, last_only: bool = False) -> torch.Tensor:
        logits = self.target.forward(self._kv(), ids, last_only=last_only)
        self.tokens.extend(ids)
        return logits

    def crop(self, length: int) -> None:
        """Forget everything after the first ``length`` positions (rejected drafts, an old answer)."""
        if length <= 0:
            self.kv, self.tokens = None, []
            return
        surplus = len(self.tokens) - length
        if surplus > 0:
            drop_last(self.kv, surplus)
            del self.tokens[length:]

    def free(self) -> None:
        self.kv, self.tokens = None, []

    def _kv(self) -> Any:
        if self.kv is None:
            self.kv = self.target.new_cache()
        return self.kv


def request_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random one when the client left it to the server."""
    return seed if seed is not None else secrets.randbits(63)


# --- the jobs a session submits (run on the worker thread) ----------------------------------------

def prefill_job(cache: SessionCache, tokens: list[int], reusable: int) -> int:
    """Hold ``tokens[:-1]`` in the cache, reusing at most ``reusable`` positions; returns those reused."""
    target = tokens[:-1]
    cache.crop(min(reusable, common_prefix(cache.tokens, target)))
    return cache.sync(target)


@dataclass(frozen=True, slots=True)
class RoundDrafts:
    """One round's drafts as tensors; a sampled round adds its proposal, checked (once) on receipt."""

    draft_ids: torch.Tensor  # [γ] int64
    ids: torch.Tensor | None = None  # [γ, K] int64, the proposal's support
    q: torch.Tensor | None = None  # [γ, K] float32, normalised by validate_proposal


def decode_round(draft: m.Draft, greedy: bool, vocab_size: int) -> RoundDrafts:
    """Decode and check a round the session accepted; raises ``ProposalError`` for a bad proposal."""
    draft_ids = torch.tensor(draft.tokens, dtype=torch.int64)
    if greedy:
        return RoundDrafts(draft_ids)
    proposal = decode_proposal(draft.q_ids, draft.q_probs, len(draft.tokens), draft.support)
    return RoundDrafts(draft_ids, proposal.ids, validate_proposal(draft_ids, proposal, vocab_size))


def verify_job(cache: SessionCache, committed: list[int], drafts: RoundDrafts, params: SamplingParams,
               seed: int) -> RoundResult:
    """One round (docs/protocol.md §4): one forward over ``[parent] + drafts``, then the core's rule.

    The random draws come from ``(seed, position, VERIFY_STREAM)`` on the CPU, so a client computing
    the same round locally (or a resumed request) gets the same answer whatever the server's device.
    """
    cache.sync(committed[:-1])
    position = len(committed)
    draft_ids = drafts.draft_ids
    logits = cache.extend([committed[-1], *draft_ids.tolist()])
    if drafts.q is None:
        return verify_greedy(draft_ids.to(logits.device), logits)
    p = target_probs(logits.cpu(), params)
    assert drafts.ids is not None
    return verify_validated(draft_ids, drafts.ids, drafts.q, p, position_generator(seed, position, VERIFY_STREAM))


def cloud_step_job(cache: SessionCache, committed: list[int], params: SamplingParams, seed: int) -> int:
    """The target's next token after ``committed`` (cloud-only mode), drawn with ``CLOUD_STREAM``."""
    cache.sync(committed[:-1])
    logits = cache.extend([committed[-1]], last_only=True)[-1]
    if params.greedy:
        return int(logits.argmax())
    probs = target_probs(logits.cpu(), params)
    return sample(probs, position_generator(seed, len(committed), CLOUD_STREAM))


# --- the worker thread with fair scheduling --------------------------------------------------------

@dataclass(slots=True)
class _Job:
    fn: Callable[[], Any]
    future: asyncio.Future
    queued: float


class ModelWorker:
    """One thread for all model work; pending jobs are served round-robin across sessions."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specd-model")
        self._queues: dict[object, deque[_Job]] = {}
        self._ring: deque[object] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.busy = False

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the worker thread directly (start-up work, before any session exists)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args))

    async def run(self, key: object, fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
        """Queue ``fn(*args)`` for session ``key``; returns ``(result, queue_s, run_s)``."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name="specd-model-dispatch")
        loop = asyncio.get_running_loop()
        job = _Job(fn=lambda: fn(*args), future=loop.create_future(), queued=time.monotonic())
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._ring.append(key)
        queue.append(job)
        assert self._wake is not None
        self._wake.set()
        return await job.future

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _next(self) -> _Job | None:
        while self._ring:
            key = self._ring.popleft()
            queue = self._queues[key]
            job = queue.popleft()
            if queue:
                self._ring.append(key)  # its next job waits for everyone else's turn
            else:
                del self._queues[key]
            if not job.future.done():  # a cancelled job (its connection went away) is skipped
                return job
        return None

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            job = self._next()
            if job is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.monotonic()
            self.busy = True
            try:
                result = await loop.run_in_executor(self._executor, job.fn)
            except Exception as exc:  # handed to the session that asked; the worker goes on
                if not job.future.done():
                    job.future.set_exception(exc)
            else:
                if not job.future.done():
                    job.future.set_result((result, started - job.queued, time.monotonic() - started))
            finally:
                self.busy = False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for queue in self._queues.values():
            for job in queue:
                job.future.cancel()
        self._queues.clear()
        self._ring.clear()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

