"""Grouped-query attention for the batched verifier on a CPU, without copying the KV for every query head.

A verify forward runs several query tokens a row against each row's slot, with the 4D mask of
:func:`~specd.daemon.kv_slots.batch_inputs`. For a query of more than one token with a mask,
transformers' SDPA path repeats every key/value head for the query heads of its group (``repeat_kv``)
before calling PyTorch: a copy of every row's whole KV, in every layer, every forward. On a CPU that copy
costs several times the attention itself, and it grows with rows and context: SmolLM2-135M, 64 rows of
300 positions, measured 0.47 s a forward at one token a row and 2.9 s at two. PyTorch's CPU kernels take
the grouped heads and a mask directly (``enable_gqa``, PyTorch 2.5 on) with the same result, so the
batched backend on a CPU runs its model's attention through :func:`grouped_sdpa`, registered with
transformers under ``GROUPED_SDPA`` with SDPA's masks; everything else goes on through transformers' own
SDPA function. On CUDA a mask with ``enable_gqa`` would fall back to PyTorch's slowest kernel, so GPUs keep
transformers' path.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from specd.daemon.kv_slots import GROUPED_SDPA


def supported() -> bool:
    """PyTorch takes grouped key/value heads in ``scaled_dot_product_attention`` (2.5 on)."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


def grouped_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a masked query of several tokens over grouped key/value
    heads goes to PyTorch as it is (``enable_gqa``), not with its key/value heads repeated first."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = groups == 1 or query.shape[2] == 1 or attention_mask is None or query.device.type != "cpu"
    if plain or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model: Any, device: torch.device) -> bool:
    """Run ``model``'s attention through :func:`grouped_sdpa` where it helps: a CPU, a model on
    transformers' SDPA path, a PyTorch that takes grouped heads. Returns whether it does."""
    if device.type != "cpu" or not supported():
        return False
    current = getattr(model.config, "_attn_implementation", None)
    if current == GROUPED_SDPA:
        return True  # an earlier engine on the same model switched it
    if current != "sdpa":
        return False
    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa)
    # the masks transformers builds for SDPA (a forward given no 4D mask, as transformers' own generate)
    AttentionMaskInterface.register(GROUPED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(GROUPED_SDPA)
    return model.config._attn_implementation == GROUPED_SDPA
