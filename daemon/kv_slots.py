"""Per-session KV memory for batched forwards: one preallocated slot per session, per layer.

Layer ``l`` keeps keys and values as ``[slots + 1, slot_len, kv_heads, head_dim]``; a session owns one
slot for its whole life and its position ``p`` lives at row ``p`` of it. So nothing is copied between
rounds, rolling back rejected drafts is just a shorter length (what lies past it is masked and later
overwritten), and a forward over several sessions writes each row's new keys straight into its slot.
The extra last slot is scratch: the padding that evens out the rows' lengths is written there.

:class:`~specd.daemon.slot_cache.SlotCache` holds the slots; this module has what needs no
transformers: which models batch, the KV shape and budget, the rows of a forward and their mask
(:func:`batch_inputs`), which restricts each row to its own slot's past.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("specd.daemon.engine")

# Architectures whose transformers code takes a custom cache and a 4D mask as batched here; others
# run one session per forward on transformers' own DynamicCache.
BATCHED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# transformers' SDPA, and the same with grouped key/value heads passed as they are (daemon/grouped_attention.py)
GROUPED_SDPA = "specd_grouped_sdpa"
SDPA_ATTENTION = ("sdpa", GROUPED_SDPA)
BATCHED_ATTENTION = (*SDPA_ATTENTION, "eager")


def batched_support(model: Any) -> str | None:
    """None when :class:`SlotCache` can batch ``model``; else why not, for the log line."""
    config = model.config
    kind = getattr(config, "model_type", "?")
    if kind not in BATCHED_MODEL_TYPES:
        return f"model type {kind!r} is not one of {', '.join(BATCHED_MODEL_TYPES)}"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in BATCHED_ATTENTION:
        return f"attention implementation {attention!r} takes no custom mask"
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None)
    if kind == "qwen2" and not getattr(config, "use_sliding_window", False):
        sliding = None
    if sliding or "sliding_attention" in layer_types:
        return "sliding-window attention needs its own mask"
    if not hasattr(model, "model") or model.get_output_embeddings() is None:
        return "the model has no separate decoder and output head"
    return None


@dataclass(frozen=True, slots=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model: Any, dtype: torch.dtype) -> KVShape:
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(layers=config.num_hidden_layers, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=head_dim, dtype=dtype)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one position over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One session's part of a forward: ``ids`` go to positions ``start …`` of ``slot``."""

    slot: int
    start: int
    ids: list[int]


def batch_inputs(rows: list[BatchRow], width: int, device: torch.device, dtype: torch.dtype,
                 attention: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``position_ids`` ``[B, width]`` and the 4D mask ``[B, 1, width, kv_len]``.

    Query ``t`` of a row sees its slot's positions ``0 … start + t``; a padding query sees position 0
    only (a row with no visible key would give NaN), and its output is never read.
    """
    kv_len = max(row.start + len(row.ids) for row in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    last_visible = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.ids)
        ids[b, :n] = torch.tensor(row.ids, dtype=torch.long)
        positions[b] = row.start + torch.arange(width)
        last_visible[b, :n] = positions[b, :n]
    visible = torch.arange(kv_len).view(1, 1, kv_len) <= last_visible.unsqueeze(-1)  # [B, width, kv_len]
    mask = visible.unsqueeze(1)
    if attention not in SDPA_ATTENTION:  # eager attention adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, torch.finfo(dtype).min)
    return ids.to(device), positions.to(device), mask.to(device)


def slot_count(shape: KVShape, *, slot_len: int, max_sessions: int, kv_cache_gib: float,
               device: torch.device) -> int:
    """How many sessions fit the KV budget (``[limits] kv_cache_gib``, else all ``max_sessions``); logged."""
    per_session = shape.bytes_per_token * slot_len
    if kv_cache_gib > 0:
        budget = int(kv_cache_gib * (1 << 30))
        source = f"[limits] kv_cache_gib = {kv_cache_gib:g}"
    else:
        budget = per_session * max_sessions
        source = f"[limits] max_sessions = {max_sessions} x max_total_tokens = {slot_len}"
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        usable = int(free * 0.9)  # the rest stays for activations
        if budget > usable:
            log.warning("KV budget from %s is %.2f GiB but %s has %.2f GiB free; using %.2f GiB", source,
                        budget / (1 << 30), device, free / (1 << 30), usable / (1 << 30))
            budget = usable
    slots = min(max_sessions, budget // per_session)
    log.info("KV cache: %.2f GiB (%s) holds %d session(s) of %d positions at %.1f KiB per position",
             slots * per_session / (1 << 30), source, slots, slot_len, shape.bytes_per_token / 1024)
    return int(slots)
