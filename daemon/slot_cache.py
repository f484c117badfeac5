"""The transformers ``Cache`` over all sessions' KV slots (the layout is described in kv_slots.py).

It is what transformers' own attention layers call: before each forward the engine hands it the batch
(:meth:`SlotCache.plan`), and every layer's ``update`` writes the new keys into the rows' slots and
returns the keys of the batch's slots up to the longest row, which the per-row mask of
:func:`~specd.daemon.kv_slots.batch_inputs` restricts to each row's own past. Imported only when a
model is loaded (transformers is heavy, and the daemon binds its port before it loads).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from specd.daemon.kv_slots import BatchRow, KVShape

# Below this a slot tensor is zero-filled; above it ``torch.empty`` takes fresh pages from the OS on the
# CPU, which read as zeros and cost no memory until a session writes there.
_ZERO_FILL_BYTES = 256 << 20


class SlotCache(Cache):
    """The transformers ``Cache`` over all sessions' slots; :meth:`plan` sets the batch it serves."""

    is_compileable = False

    def __init__(self, shape: KVShape, slots: int, slot_len: int, device: torch.device) -> None:
        # Cache.__init__ builds per-layer objects this cache does not use; set what its methods read.
        self.layers, self.layer_class_to_replicate, self.offloading = [], None, False
        self.shape, self.slots, self.slot_len, self.device = shape, slots, slot_len, device
        size = (slots + 1, slot_len, shape.kv_heads, shape.head_dim)
        layer_bytes = 2 * torch.Size(size).numel() * torch.empty((), dtype=shape.dtype).element_size()
        make = torch.zeros if device.type != "cpu" or layer_bytes < _ZERO_FILL_BYTES else torch.empty
        self.keys = [make(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.values = [make(size, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self._write: torch.Tensor | None = None
        self._read: slice | torch.Tensor = slice(0, 0)
        self._kv_len = 0

    def plan(self, rows: list[BatchRow], width: int) -> None:
        """Where this forward writes (``[rows × width]`` flat indices) and which slots it reads."""
        scratch = self.slots * self.slot_len
        index = torch.full((len(rows), width), scratch, dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row.ids)
            index[b, :n] = torch.arange(row.slot * self.slot_len + row.start,
                                        row.slot * self.slot_len + row.start + n)
            index[b, n:] += torch.arange(width - n) % self.slot_len  # distinct scratch rows for the padding
        self._write = index.view(-1).to(self.device)
        slots = [row.slot for row in rows]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        # A run of consecutive slots (the usual case: every session has work) is read as a view.
        self._read = slice(slots[0], slots[0] + len(slots)) if contiguous else torch.tensor(slots, device=self.device)
        self._kv_len = max(row.start + len(row.ids) for row in rows)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, heads, width, dim]`` new keys into the slots; return ``[B, heads, kv_len, dim]``."""
        assert self._write is not None, "SlotCache.plan() must run before each forward"
        out = []
        for store, new in ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states)):
            flat = store.view(-1, self.shape.kv_heads, self.shape.head_dim)
            flat.index_copy_(0, self._write, new.transpose(1, 2).reshape(-1, *flat.shape[1:]).to(store.dtype))
            out.append(store[self._read, : self._kv_len].transpose(1, 2))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self._kv_len, 0
