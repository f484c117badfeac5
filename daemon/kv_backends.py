"""The two ways the engine runs a forward: batched over slots, or one session at a time.

Both take the rows of one forward (:class:`~specd.daemon.kv_slots.BatchRow`) and return, per row, the
float32 logits of its last ``wanted`` positions. ``truncate`` forgets a session's positions past a
length (O(1) for slots: the mask hides them); ``release`` frees a session's memory.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Protocol

import torch

from specd.daemon.kv_slots import BatchRow, KVShape, batch_inputs

log = logging.getLogger("specd.daemon.engine")


class KVBackend(Protocol):
    capacity: int  # sessions it can hold at once
    max_rows: int  # sessions per forward

    def forward(self, rows: list[BatchRow], wanted: list[int]) -> list[torch.Tensor | None]: ...

    def truncate(self, slot: int, length: int) -> None: ...

    def release(self, slot: int) -> None: ...


def _cache_kwarg(module: Any) -> str:
    """``cache`` in recent transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class SlotBackend:
    """Every row of a forward in one batch through transformers' model code and a :class:`SlotCache`."""

    def __init__(self, model: Any, *, dtype: torch.dtype, device: torch.device, slots: int, slot_len: int,
                 max_rows: int) -> None:
        from specd.daemon.grouped_attention import use_grouped_sdpa  # transformers: only once a model is loaded
        from specd.daemon.slot_cache import SlotCache

        self.model, self.device, self.dtype = model, device, dtype
        self.capacity, self.max_rows = slots, max_rows
        self.cache = SlotCache(KVShape.of(model, dtype), slots, slot_len, device)
        self._decoder = model.model
        self._head = model.get_output_embeddings()
        self._kwarg = _cache_kwarg(self._decoder)
        if use_grouped_sdpa(model, device):
            log.info("attention: grouped key/value heads passed to PyTorch as they are (%s)", device)
        self._attention = getattr(model.config, "_attn_implementation", None) or "eager"

    @torch.inference_mode()
    def forward(self, rows: list[BatchRow], wanted: list[int]) -> list[torch.Tensor | None]:
        width = max(len(row.ids) for row in rows)
        ids, positions, mask = batch_inputs(rows, width, self.device, self.dtype, self._attention)
        self.cache.plan(rows, width)
        hidden = self._decoder(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                               **{self._kwarg: self.cache}).last_hidden_state  # [B, width, hidden]
        picked = [hidden[b, len(row.ids) - k:len(row.ids)] for b, (row, k) in enumerate(zip(rows, wanted, strict=True))
                  if k > 0]
        if not picked:
            return [None] * len(rows)
        logits = self._head(torch.cat(picked)).float()  # only the positions someone reads
        out: list[torch.Tensor | None] = []
        offset = 0
        for k in wanted:
            out.append(logits[offset:offset + k] if k > 0 else None)
            offset += k
        return out

    def truncate(self, slot: int, length: int) -> None:
        pass  # positions past a session's length are masked, then overwritten

    def release(self, slot: int) -> None:
        pass


class SessionBackend:
    """The fallback for models :class:`SlotCache` cannot batch: transformers' ``DynamicCache`` per session."""

    max_rows = 1

    def __init__(self, model: Any, *, capacity: int) -> None:
        self.model, self.capacity = model, capacity
        self._caches: dict[int, Any] = {}
        self._kwarg = _cache_kwarg(model)
        self._device = next(model.parameters()).device

    @torch.inference_mode()
    def forward(self, rows: list[BatchRow], wanted: list[int]) -> list[torch.Tensor | None]:
        from transformers import DynamicCache

        (row,), (k,) = rows, wanted
        cache = self._caches.get(row.slot)
        if cache is None:
            cache = self._caches[row.slot] = DynamicCache(config=self.model.config)
        assert cache.get_seq_length() == row.start, "the engine and the session's cache disagree"
        tensor = torch.tensor([row.ids], dtype=torch.long, device=self._device)
        out = self.model(input_ids=tensor, use_cache=True, logits_to_keep=max(k, 1), **{self._kwarg: cache})
        return [out.logits[0, -k:].float() if k > 0 else None]

    def truncate(self, slot: int, length: int) -> None:
        cache = self._caches.get(slot)
        if cache is None:
            return
        if length <= 0:
            del self._caches[slot]
            return
        surplus = cache.get_seq_length() - length
        if surplus > 0:
            cache.crop(-surplus)  # transformers 5 refuses an absolute length; a negative count works in 4 and 5

    def release(self, slot: int) -> None:
        self._caches.pop(slot, None)
