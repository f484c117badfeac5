"""The ``openvino`` drafter: a stateful OpenVINO IR on an Intel CPU, GPU or NPU.

The model keeps its KV cache as OpenVINO *state* (ReadValue/Assign pairs), as both specd's own export
(:mod:`specd.desktop.drafters.openvino_export`) and ``optimum-cli export openvino`` produce. Rollback is exact:
each state tensor is cut back to the kept length (its sequence axis), so the next pass sees exactly
the cache a fresh run would have built.

NPU: the NPU compiles static shapes only. OpenVINO's NPUW "LLM" mode splits the model into a prefill
graph of ``max_prompt`` tokens and a one-token generate graph, with the KV cache held inside the
plugin where it cannot be trimmed; rollback therefore replays the kept tokens, and single tokens are
fed one at a time after the prefill. It also needs symmetric int4/int8 weights (what specd's export
writes). When the NPU refuses the model, the error says so and the loader falls back to the next device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specd.desktop.drafters.base import CachedDrafter
from specd.shared.errors import DeviceError, ModelError

OV_MODEL = "openvino_model.xml"
EXPORT_INFO = "specd_export.json"


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise DeviceError(f"the openvino backend needs the openvino package ({exc}); install specd[openvino]") from None
    return openvino


def is_openvino_folder(folder: str | Path) -> bool:
    return (Path(folder) / OV_MODEL).is_file()


def npu_properties(max_prompt: int, min_response: int) -> dict[str, Any]:
    """Compile options that let the NPU run a stateful LLM with static shapes (OpenVINO NPUW)."""
    return {"NPU_USE_NPUW": "YES", "NPUW_LLM": "YES", "NPUW_LLM_BATCH_DIM": 0, "NPUW_LLM_SEQ_LEN_DIM": 2,
            "NPUW_LLM_MAX_PROMPT_LEN": max_prompt, "NPUW_LLM_MIN_RESPONSE_LEN": min_response}


class OpenVINODrafter(CachedDrafter):
    """A stateful OpenVINO causal LM (inputs ``input_ids`` and optionally ``attention_mask``,
    ``position_ids``, ``beam_idx``; output ``logits``)."""

    backend = "openvino"

    def __init__(self, folder: str | Path, device: str = "CPU", *, max_prompt: int = 1024,
                 min_response: int = 256, model_name: str = "") -> None:
        super().__init__()
        ov = import_openvino()
        self._ov = ov
        folder = Path(folder)
        if not is_openvino_folder(folder):
            raise ModelError(f"{folder} is not an OpenVINO model folder (no {OV_MODEL}); prepare one with "
                             "`specd convert --backend openvino`")
        self.device = device.upper()
        self.model_name = model_name or folder.name
        self.tokenizer_path = folder
        core = ov.Core()
        model = core.read_model(str(folder / OV_MODEL))
        self._inputs = {port.get_any_name() for port in model.inputs}
        if "input_ids" not in self._inputs or not model.get_sinks():
            raise ModelError(f"{folder / OV_MODEL} is not a stateful causal LM (needs an input_ids input and its "
                             "KV cache as state); export it with `specd convert --backend openvino`")
        self._vocab = int(model.outputs[0].get_partial_shape()[-1].get_length())
        self._npu = self.device.startswith("NPU")
        self._max_prompt = max_prompt
        properties: dict[str, Any] = {}
        info = _export_info(folder)
        if self._npu:
            properties.update(npu_properties(max_prompt, min_response))
        elif info.get("precision") == "fp32" and self.device.startswith("CPU"):
            properties["INFERENCE_PRECISION_HINT"] = "f32"  # an fp32 build is asked for fp32 numbers
        try:
            compiled = core.compile_model(model, self.device, properties)
        except Exception as exc:  # OpenVINO raises RuntimeError with the plugin's text
            raise DeviceError(self._explain(exc, info)) from None
        self._request = compiled.create_infer_request()
        # Name of the first output: "logits" in every export we read, but take whatever comes first.
        self._logits_port = compiled.outputs[0]

    def _explain(self, exc: Exception, info: dict[str, Any]) -> str:
        text = f"OpenVINO cannot compile {self.model_name} for {self.device}: {exc}".strip()
        if self._npu:
            precision = info.get("precision", "unknown")
            text += (f". The NPU needs static shapes (prompts up to {self._max_prompt} tokens here) and symmetric "
                     f"int4/int8 weights (this build: {precision}); a current NPU driver is required too. Prepare "
                     "one with `specd convert --backend openvino --precision int4` and set [devices.npu] model_path")
        return text

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def _infer(self, token_ids: list[int], start: int) -> torch.Tensor:
        count = len(token_ids)
        feed: dict[str, np.ndarray] = {"input_ids": np.asarray([token_ids], dtype=np.int64)}
        if "attention_mask" in self._inputs:
            feed["attention_mask"] = np.ones((1, start + count), dtype=np.int64)
        if "position_ids" in self._inputs:
            feed["position_ids"] = np.arange(start, start + count, dtype=np.int64)[None]
        if "beam_idx" in self._inputs:
            feed["beam_idx"] = np.zeros(1, dtype=np.int32)
        self._request.infer(feed)
        logits = self._request.get_tensor(self._logits_port).data
        return torch.from_numpy(np.array(logits[0, -1], dtype=np.float32))

    def _forward(self, token_ids: list[int], start: int) -> torch.Tensor:
        if self._npu and start > 0 and len(token_ids) > 1:
            # After its prefill the NPU runs a one-token graph.
            logits = None
            for offset, token in enumerate(token_ids):
                logits = self._infer([token], start + offset)
            return logits
        if self._npu and start == 0 and len(token_ids) > self._max_prompt:
            raise ModelError(f"the prompt has {len(token_ids)} tokens; the NPU draft was compiled for at most "
                             f"{self._max_prompt} ([devices.npu] limits)")
        return self._infer(token_ids, start)

    def _truncate(self, length: int) -> None:
        if length == 0:
            self._request.reset_state()
            return
        if not self._npu and self._trim_states(length):
            return
        # The state cannot be cut (NPU): rebuild it from the kept tokens.
        self._request.reset_state()
        self._forward(self._tokens[:length], 0)

    def _trim_states(self, length: int) -> bool:
        states = self._request.query_state()
        trimmed = []
        for state in states:
            value = state.state.data
            if value.ndim != 4 or value.shape[2] < length:
                return False
            trimmed.append(np.ascontiguousarray(value[:, :, :length, :]))
        for state, value in zip(states, trimmed, strict=True):
            state.state = self._ov.Tensor(value)
        return True

    def close(self) -> None:
        self._request = None


def _export_info(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / EXPORT_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
