"""The target model: its device and dtype, loading it, and what the handshake announces of it.

The forwards themselves are the engine's (engine.py); it records here how many positions each
forward processed (``forward_positions``), so tests can check that no prefix is ever recomputed.
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from specd.shared.config import Config
from specd.shared.errors import ConfigError, ModelError
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.hf_models import cuda_problem, model_eos_ids
from specd.shared.models import ensure_hf_folder, resolve_source

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
        # No tokenizer: a randomly initialised model for capacity planning, which no client talks to.
        self.fingerprint = tokenizer_fingerprint(tokenizer) if tokenizer is not None else ""
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos = model_eos_ids(model, tokenizer)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
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

    def record_forward(self, positions: int) -> None:
        self.forward_positions.append(positions)
        self.forwards_total += 1
        self.positions_total += positions

    def release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

