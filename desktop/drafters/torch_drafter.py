"""The ``torch`` drafter: a Hugging Face causal LM on the CPU or a CUDA GPU, with a cropped KV cache.

Needs only what specd already depends on (torch, transformers). The slowest CPU backend for the
embedded draft (it runs fp32 weights), but the one that runs any Hugging Face model as it is, and the
GPU path on machines with CUDA.
"""

from __future__ import annotations

from pathlib import Path

import torch

from specd.desktop.drafters.base import CachedDrafter
from specd.shared.errors import DeviceError, ModelError
from specd.shared.hf_models import cache_kwarg, cuda_problem, drop_last


def _check_device(device: str) -> torch.device:
    dev = torch.device(device)
    problem = cuda_problem(dev)
    if problem is not None:
        raise DeviceError(f"{device}: {problem}")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"the torch drafter runs on cpu or cuda:N, not {device!r}")
    return dev


class TorchDrafter(CachedDrafter):
    """A Hugging Face model folder run by transformers, KV cache in a ``DynamicCache``."""

    backend = "torch"
    feeds_ahead = True

    def __init__(self, folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                 model_name: str = "") -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, DynamicCache

        self._device = _check_device(device)
        self.device = str(self._device)
        self.model_name = model_name or Path(folder).name
        self.tokenizer_path = Path(folder)
        # fp32 on the CPU (bf16 matmuls are slow there); half precision on a GPU.
        if dtype is None:
            dtype = torch.float16 if self._device.type == "cuda" else torch.float32
        try:
            self._model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(self._device).eval()
        except torch.cuda.OutOfMemoryError as exc:
            raise DeviceError(f"{self.device}: not enough GPU memory for {self.model_name}: {exc}") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the draft model from {folder}: {exc}") from None
        self._vocab = int(self._model.get_output_embeddings().weight.shape[0])
        self._cache_type = DynamicCache
        self._cache_kwarg = cache_kwarg(self._model)
        self._cache = DynamicCache(config=self._model.config)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def _forward(self, token_ids: list[int], start: int) -> torch.Tensor:
        return self._run(token_ids, start, keep=1)[-1]

    def _forward_all(self, token_ids: list[int], start: int) -> torch.Tensor:
        return self._run(token_ids, start, keep=len(token_ids))

    @torch.inference_mode()
    def _run(self, token_ids: list[int], start: int, keep: int) -> torch.Tensor:
        """Feed ``token_ids``; float32 logits ``[keep, V]`` of the last ``keep`` of them."""
        ids = torch.tensor([token_ids], dtype=torch.long, device=self._device)
        positions = torch.arange(start, start + len(token_ids), device=self._device)
        out = self._model(input_ids=ids, use_cache=True, cache_position=positions, logits_to_keep=keep,
                          **{self._cache_kwarg: self._cache})
        return out.logits[0].float().cpu()

    def _truncate(self, length: int) -> None:
        if length == 0:
            self._cache = self._cache_type(config=self._model.config)
            return
        drop_last(self._cache, self._cache.get_seq_length() - length)

    def close(self) -> None:
        self._model = None
        self._cache = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
