"""Helpers for loaded Hugging Face transformers models that the verifier and the torch drafter share.

Kept beside ``models.py`` (which finds and prepares model folders). Nothing here imports transformers:
the helpers take the loaded model, cache or tokenizer and read only what transformers puts on them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_kwarg(model: Any) -> str:
    """The forward argument that takes the KV cache: ``cache`` in recent transformers, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def drop_last(cache: Any, count: int) -> None:
    """Remove the last ``count`` positions of a ``DynamicCache``.

    A negative count works under both transformers 4 and 5 (5 refuses an absolute length).
    """
    if count > 0:
        cache.crop(-count)


def cuda_problem(device: torch.device) -> str | None:
    """Why this torch cannot run on the CUDA ``device``, or None (also for non-CUDA devices)."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "this torch has no CUDA (a CPU-only build, or no NVIDIA driver)"
    if (device.index or 0) >= torch.cuda.device_count():
        return f"only {torch.cuda.device_count()} CUDA device(s) present"
    return None


def eos_ids(tokenizer: Any) -> set[int]:
    """End-of-sequence ids a tokenizer names (one id or a list)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        return {eos}
    if isinstance(eos, (list, tuple)):
        return {int(i) for i in eos}
    return set()


def model_eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids as ``generate()`` sees them (generation config, else model config), plus the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            ids.update([value] if isinstance(value, int) else list(value))
            break
    return sorted(ids | eos_ids(tokenizer))
