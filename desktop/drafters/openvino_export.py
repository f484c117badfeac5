"""Export a Hugging Face causal LM to a stateful OpenVINO IR, with symmetric int4/int8 weights.

Why not optimum-intel: it pulls torchvision and a CUDA build of torch (~6 GB), too much for a laptop
install or CI. What it does that specd needs is small: trace the model with its KV cache as explicit
inputs and outputs (``openvino.convert_model`` on a torch wrapper), turn those pairs into OpenVINO state
(``MakeStateful``) so the cache stays inside the runtime, and compress the weights. The compression
writes the pattern OpenVINO's plugins execute directly (``Constant(i4|i8) → Convert → Multiply(scale)``),
symmetric because the NPU needs it: int4 in groups along the input axis for the transformer blocks,
int8 per output channel for the embedding and the output head (as NNCF does by default, to keep quality).
The result has the same inputs and state layout as an optimum-intel export (no ``beam_idx``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specd.desktop.drafters.openvino import EXPORT_INFO, OV_MODEL, import_openvino
from specd.shared.errors import ModelError
from specd.shared.hf_models import cache_kwarg

PRECISIONS = ("int4", "int8", "fp16", "fp32")
_GROUPS = (128, 64, 32)


def export_openvino(hf_folder: Path, out: Path, precision: str, say: Callable[[str], None]) -> None:
    """Write ``openvino_model.xml/.bin``, the tokenizer and ``specd_export.json`` into ``out``."""
    if precision not in PRECISIONS:
        raise ModelError(f"OpenVINO precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    ov = import_openvino()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"Loading {hf_folder.name}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(hf_folder))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {hf_folder} for the OpenVINO export: {exc}") from None
    say("Tracing the model for OpenVINO")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # tracing triggers deprecation notices meant for model authors
    try:
        ov_model = _convert(ov, model)
    finally:
        hf_logging.set_verbosity(verbosity)
    if precision in ("int4", "int8"):
        say(f"Compressing the weights to symmetric {precision}")
        count = compress_weights(ov, ov_model, precision)
        say(f"Compressed {count} weight matrices")
    say("Saving the OpenVINO model")
    ov.save_model(ov_model, str(out / OV_MODEL), compress_to_fp16=precision == "fp16")
    tokenizer.save_pretrained(str(out))
    info = {"format": "specd-openvino-1", "precision": precision, "source": str(hf_folder)}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


class _WithExplicitCache(torch.nn.Module):
    """The model as a function of (ids, mask, positions, past keys/values) → (logits, present keys/values)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        # Fill the layers directly: DynamicCache's own update concatenates onto an empty 1-D tensor,
        # which torch allows but OpenVINO's converter does not.
        for index, layer in enumerate(cache.layers):
            layer.keys, layer.values = past[2 * index], past[2 * index + 1]
            layer.device = input_ids.device
            layer.is_initialized = True
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): cache})
        present: list[torch.Tensor] = []
        for layer in cache.layers:  # updated in place with this step's keys and values
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _convert(ov: Any, model: Any) -> Any:
    config = model.config
    layers = int(config.num_hidden_layers)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    past_len, new = 3, 2  # any sizes: the traced graph keeps them dynamic
    example = (torch.ones(1, new, dtype=torch.long), torch.ones(1, past_len + new, dtype=torch.long),
               torch.arange(past_len, past_len + new)[None],
               *[torch.zeros(1, kv_heads, past_len, head_dim) for _ in range(2 * layers)])
    pairs = {f"past_key_values.{i}.{kind}": f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            ov_model = ov.convert_model(_WithExplicitCache(model), example_input=example)
    except Exception as exc:  # the converter raises many kinds for unsupported layers
        raise ModelError(f"OpenVINO could not convert {type(model).__name__}: {exc}") from exc
    names = ["input_ids", "attention_mask", "position_ids", *pairs]
    for port, name in zip(ov_model.inputs, names, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, ["logits", *pairs.values()], strict=True):
        port.get_tensor().set_names({name})
    # One sequence at a time: a static batch of 1 lets the state start empty ([1, heads, 0, dim]).
    ov_model.reshape({"input_ids": [1, -1], "attention_mask": [1, -1], "position_ids": [1, -1],
                      **{name: [1, kv_heads, -1, head_dim] for name in pairs}})
    from openvino import passes

    manager = passes.Manager()
    manager.register_pass(passes.MakeStateful(pairs))
    manager.run_passes(ov_model)
    return ov_model


def _constant_weight(node: Any, index: int) -> Any | None:
    """The f32 constant feeding input ``index`` of ``node`` (through a Convert), or None."""
    source = node.input_value(index).get_node()
    if source.get_type_name() == "Convert":
        source = source.input_value(0).get_node()
    if source.get_type_name() != "Constant" or len(source.get_output_shape(0)) != 2:
        return None
    return source


def compress_weights(ov: Any, ov_model: Any, precision: str) -> int:
    """Replace the 2-D weights of MatMul and Gather (embedding) with symmetric int4/int8 + scale subgraphs."""
    from openvino import opset13 as ops

    ops_list = list(ov_model.get_ordered_ops())
    logits_node = ov_model.outputs[0].get_node().input_value(0).get_node()
    decompressed: dict[tuple[int, str], Any] = {}  # (constant id, scheme) -> subgraph output, shared when tied

    def int8_rows(weight: Any) -> Any:  # [rows, cols], one scale per row
        key = (id(weight), "int8")
        if key not in decompressed:
            data = weight.get_data().astype(np.float32)
            scale = np.abs(data).max(axis=1, keepdims=True) / 127.0
            scale[scale == 0] = 1.0
            q = np.clip(np.round(data / scale), -127, 127).astype(np.int8)
            decompressed[key] = ops.multiply(ops.convert(ops.constant(q, dtype=ov.Type.i8), ov.Type.f32),
                                             ops.constant(scale.astype(np.float32))).output(0)
        return decompressed[key]

    def int4_groups(weight: Any) -> Any:  # [out, in] with groups along `in`
        key = (id(weight), "int4")
        if key not in decompressed:
            data = weight.get_data().astype(np.float32)
            rows, cols = data.shape
            group = next((g for g in _GROUPS if cols % g == 0), cols)
            grouped = data.reshape(rows, cols // group, group)
            scale = np.abs(grouped).max(axis=2, keepdims=True) / 7.0
            scale[scale == 0] = 1.0
            q = np.clip(np.round(grouped / scale), -8, 7).astype(np.int8)
            scaled = ops.multiply(ops.convert(ops.constant(q, dtype=ov.Type.i4), ov.Type.f32),
                                  ops.constant(scale.astype(np.float32)))
            decompressed[key] = ops.reshape(scaled, ops.constant(np.array([rows, cols], dtype=np.int64)),
                                            special_zero=False).output(0)
        return decompressed[key]

    count = 0
    for node in ops_list:
        kind = node.get_type_name()
        if kind == "Gather":
            weight = _constant_weight(node, 0)
            if weight is not None:
                node.input(0).replace_source_output(int8_rows(weight))
                count += 1
        elif kind == "MatMul":
            weight = _constant_weight(node, 1)
            if weight is None:
                continue
            transposed = node.get_attributes()["transpose_b"]  # weight stored [out, in]
            if not transposed:  # rare; keep the math simple by compressing [out, in] and transposing back
                continue
            head = node is logits_node or precision == "int8"
            node.input(1).replace_source_output(int8_rows(weight) if head else int4_groups(weight))
            count += 1
    ov_model.validate_nodes_and_infer_types()
    return count
