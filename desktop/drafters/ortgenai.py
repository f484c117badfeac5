"""The ``onnxruntime-genai`` drafter: a model built by the ORT GenAI builder, driven token by token.

The Windows-first backend: on Windows the Windows ML catalog supplies NPU and GPU execution providers
(registered through :mod:`specd.desktop.drafters.winml`); everywhere it runs on the CPU provider, where the int4
build of the embedded draft is the fastest drafter specd has (~5 ms/token on a laptop core).
The generator's own ``append_tokens`` / ``get_logits`` / ``rewind_to`` give the logits and an exact
rollback; specd samples the proposal itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from specd.desktop.drafters.base import CachedDrafter
from specd.shared.errors import DeviceError, ModelError

GENAI_CONFIG = "genai_config.json"


def import_genai() -> Any:
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise DeviceError(f"the onnxruntime-genai backend needs the onnxruntime-genai package ({exc}); "
                          "install specd[ortgenai]") from None
    return onnxruntime_genai


def is_genai_folder(folder: str | Path) -> bool:
    return (Path(folder) / GENAI_CONFIG).is_file()


class OrtGenAIDrafter(CachedDrafter):
    """An ORT GenAI model folder (``genai_config.json`` + ``model.onnx``) on one execution provider."""

    backend = "onnxruntime-genai"
    feeds_ahead = True

    def __init__(self, folder: str | Path, provider: str = "cpu", *, max_length: int = 4096,
                 provider_options: dict[str, str] | None = None, model_name: str = "") -> None:
        super().__init__()
        og = import_genai()
        folder = Path(folder)
        if not is_genai_folder(folder):
            raise ModelError(f"{folder} is not an ONNX Runtime GenAI model (no {GENAI_CONFIG}); "
                             "prepare one with `specd convert --backend onnxruntime-genai`")
        genai_config = json.loads((folder / GENAI_CONFIG).read_text(encoding="utf-8"))["model"]
        self._vocab = int(genai_config["vocab_size"])
        # The generator pre-allocates its KV buffer for max_length tokens (shared past/present buffers are
        # ~15 % faster than growing ones); never beyond what the model was built for.
        self.max_length = min(max_length, int(genai_config.get("context_length", max_length)))
        self.device = provider.lower()
        self.model_name = model_name or folder.name
        self.tokenizer_path = folder
        try:
            config = og.Config(str(folder))
            # The generator masks prompt tokens equal to pad_token_id as padding. A drafter never pads
            # (one sequence), and SmolLM2's pad is its <|im_end|>, which every chat prompt contains.
            config.overlay(json.dumps({"model": {"pad_token_id": -1}}))
            config.clear_providers()
            if provider.lower() != "cpu":
                config.append_provider(provider)
                for key, value in (provider_options or {}).items():
                    config.set_provider_option(provider, key, value)
            self._model = og.Model(config)
        except Exception as exc:  # the native layer raises RuntimeError for a missing provider or bad model
            where = "the CPU" if provider.lower() == "cpu" else f"the {provider} execution provider"
            raise DeviceError(f"ONNX Runtime GenAI cannot load {self.model_name} on {where}: {exc}") from None
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=self.max_length, past_present_share_buffer=True)
        self._params = params
        self._generator = og.Generator(self._model, params)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def _forward(self, token_ids: list[int], start: int) -> torch.Tensor:
        return self._run(token_ids, start, every=False)[-1]

    def _forward_all(self, token_ids: list[int], start: int) -> torch.Tensor:
        return self._run(token_ids, start, every=True)

    def _run(self, token_ids: list[int], start: int, *, every: bool) -> torch.Tensor:
        """Feed ``token_ids``; logits ``[n, V]`` of the last token, or of every token fed (``every``)."""
        if start + len(token_ids) > self.max_length:
            raise ModelError(f"the draft context is full ({self.max_length} tokens, [limits] max_total_tokens)")
        try:
            self._generator.append_tokens(token_ids)
            # The model's logits output holds every token fed; get_logits keeps only the last.
            logits = self._generator.get_output("logits") if every else self._generator.get_logits()
        except RuntimeError as exc:  # the native runtime's message names the failing node
            raise DeviceError(f"ONNX Runtime GenAI failed running {self.model_name} on {self.device}: {exc}") from None
        return torch.from_numpy(logits[0].copy())

    def _truncate(self, length: int) -> None:
        self._generator.rewind_to(length)

    def close(self) -> None:
        self._generator = None
        self._params = None
        self._model = None
