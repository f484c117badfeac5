"""Quantised drafts: int8 and int4 builds for ONNX Runtime GenAI and OpenVINO from a tiny model, with
the weight types read back from the files; the builder's precision fallback table; and
``[models] draft_precision`` from the config reaching the build the loader opens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specd.desktop.drafters import convert, load_drafter
from specd.desktop.drafters.convert import BUILDER_PRECISIONS, PRECISIONS, builder_precision, prepare_draft
from specd.desktop.drafters.devices import DeviceRow
from specd.desktop.drafters.openvino import OpenVINODrafter
from specd.desktop.drafters.ortgenai import OrtGenAIDrafter
from specd.desktop.drafters.torch_drafter import TorchDrafter
from specd.shared.config import load_config
from tests.tiny_models import save_tiny_ort_model

PROMPT = [1, 4, 9, 16, 25, 36]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return save_tiny_ort_model(tmp_path_factory.mktemp("tiny-precision") / "hf", seed=6)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The draft cache the builds below land in; the config tests load from the same cache."""
    return tmp_path_factory.mktemp("draft-cache")


# The int4 ONNX Runtime GenAI build is checked where `specd convert` makes it (test_convert.py): one
# builder run fewer here.
BUILT = [("onnxruntime-genai", "int8"), ("openvino", "int8"), ("openvino", "int4")]


@pytest.fixture(scope="module")
def builds(tiny_hf, cache):
    """Each quantised build once, the way the loader prepares drafts (cached under ``cache``)."""
    return {(backend, precision): prepare_draft(str(tiny_hf), backend, precision, cache_override=str(cache))
            for backend, precision in BUILT}


# -- reading the weight types back ---------------------------------------------------------------
def onnx_weight_types(folder: Path) -> dict[str, str]:
    """For every matrix multiplication in the ONNX graph: how its weight initializer is stored —
    ``int4``/``int8`` for MatMulNBits (whose packed uint8 blocks are checked against its bit width),
    else the ONNX data type of the float initializer."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    initializers = {init.name: init for init in model.graph.initializer}
    types: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            packed = initializers[node.input[1]]
            assert packed.data_type == onnx.TensorProto.UINT8, node.name
            n_out, blocks, blob = packed.dims  # [N, K / block_size, block_size · bits / 8]
            assert blob * 8 == attrs["block_size"] * attrs["bits"] and n_out == attrs["N"], node.name
            assert blocks * attrs["block_size"] >= attrs["K"], node.name
            types[node.name] = f"int{attrs['bits']}"
        elif node.op_type in ("MatMul", "Gemm") and node.input[1] in initializers:
            types[node.name] = onnx.TensorProto.DataType.Name(initializers[node.input[1]].data_type).lower()
    return types


def openvino_weight_types(folder: Path) -> dict[str, str]:
    """For every MatMul and Gather with a constant weight in the OpenVINO IR: the element type of the
    constant it is decompressed from (``Constant → Convert → Multiply(scale) [→ Reshape]``)."""
    import openvino as ov

    model = ov.Core().read_model(str(folder / "openvino_model.xml"))
    types: dict[str, str] = {}
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        port = 1 if kind == "MatMul" else 0 if kind == "Gather" else None
        if port is None:
            continue
        source = node.input_value(port).get_node()
        while source.get_type_name() in ("Reshape", "Multiply", "Convert"):
            source = source.input_value(0).get_node()
        if source.get_type_name() == "Constant" and len(source.get_output_shape(0)) >= 2:
            types[node.get_friendly_name()] = source.get_element_type().get_type_name()
    return types


def torch_logits(folder: Path) -> torch.Tensor:
    return run(TorchDrafter(folder))


def run(drafter) -> torch.Tensor:
    try:
        drafter.prefill(PROMPT)
        return drafter.next_logits().float().clone()
    finally:
        drafter.close()


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(logits, reference, dim=0))


# -- ONNX Runtime GenAI -------------------------------------------------------------------------
def check_ortgenai_weights(folder: Path, hf_folder: Path, precision: str) -> None:
    types = onnx_weight_types(folder)
    # Both layers' projections (the builder fuses q, k and v) and the output head, all at the asked bits.
    projections = {f"/model/layers.{i}/{p}" for i in range(2)
                   for p in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
    assert {name.rsplit("/", 1)[0] for name in types} == projections | {"/lm_head"}, types
    assert set(types.values()) == {precision}, types
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["vocab_size"] == 64
    logits = run(OrtGenAIDrafter(folder, max_length=64))
    # Quantisation moves the logits a little, not to another distribution (int8 much less than int4).
    assert agreement(logits, torch_logits(hf_folder)) > (0.999 if precision == "int8" else 0.98)


def test_ortgenai_int8_stores_every_projection_as_8_bit_blocks(builds, tiny_hf):
    folder = builds[("onnxruntime-genai", "int8")]
    assert folder.name.endswith("-int8-cpu")
    check_ortgenai_weights(folder, tiny_hf, "int8")


# -- OpenVINO -----------------------------------------------------------------------------------
def test_openvino_int8_stores_every_weight_as_i8(builds, tiny_hf):
    folder = builds[("openvino", "int8")]
    assert json.loads((folder / "specd_export.json").read_text())["precision"] == "int8"
    types = openvino_weight_types(folder)
    assert len(types) == 2 * 7 + 2, types  # both layers' projections, the embedding and the output head
    assert set(types.values()) == {"i8"}, types
    assert agreement(run(OpenVINODrafter(folder)), torch_logits(tiny_hf)) > 0.999


def test_openvino_int4_stores_blocks_as_i4_and_embedding_and_head_as_i8(builds, tiny_hf):
    folder = builds[("openvino", "int4")]
    assert json.loads((folder / "specd_export.json").read_text())["precision"] == "int4"
    types = openvino_weight_types(folder)
    blocks = {name: kind for name, kind in types.items() if ".layers." in name}
    others = {name.split("/")[0]: kind for name, kind in types.items() if ".layers." not in name}
    assert len(blocks) == 2 * 7 and set(blocks.values()) == {"i4"}, blocks
    assert others == {"__module.model.model.embed_tokens": "i8", "__module.model.lm_head": "i8"}, others
    assert agreement(run(OpenVINODrafter(folder)), torch_logits(tiny_hf)) > 0.98


# -- the precision fallback table ---------------------------------------------------------------
@pytest.mark.parametrize(("provider", "asked", "built"), [
    ("cpu", "int8", "int8"), ("cpu", "int4", "int4"), ("cpu", "fp16", "fp32"),  # fp16 falls to full precision
    ("dml", "int8", "int4"), ("dml", "fp32", "fp16"), ("dml", "fp16", "fp16"),
    ("webgpu", "fp32", "int8"), ("webgpu", "fp16", "int8"), ("webgpu", "int4", "int4"),
    ("NvTensorRtRtx", "int4", "fp16"), ("nvtensorrtrtx", "fp32", "fp16"),
    ("cuda", "fp16", "fp16"),
    ("some-future-ep", "int8", "int8"),  # a provider the table does not know gets what was asked
])
def test_the_builder_precision_falls_back_to_the_closest_supported(provider, asked, built):
    assert builder_precision(provider, asked) == built


def test_every_fallback_is_a_precision_the_provider_supports():
    for provider, supported in BUILDER_PRECISIONS.items():
        for asked in PRECISIONS:
            built = builder_precision(provider, asked)
            assert built in supported, (provider, asked, built)
            assert (built == asked) == (asked in supported), (provider, asked, built)


def test_prepare_draft_builds_and_caches_under_the_fallback_precision(tiny_hf, tmp_path, monkeypatch):
    """The builder is run for the precision the provider supports, and the cache is named after it, so an
    int8 request for DirectML is an int4 build (the builder itself runs in the tests above)."""
    asked: list[tuple[str, str]] = []

    def recording_builder(hf_folder, out, precision, say, *, execution_provider="cpu"):
        asked.append((precision, execution_provider))
        (out / "genai_config.json").write_text("{}")

    monkeypatch.setattr(convert, "build_ortgenai", recording_builder)
    folder = prepare_draft(str(tiny_hf), "onnxruntime-genai", "int8", cache_override=str(tmp_path),
                           execution_provider="dml")
    assert asked == [("int4", "dml")]
    assert folder.name.endswith("-int4-dml") and (folder / ".complete").is_file()


# -- [models] draft_precision from the config ----------------------------------------------------
@pytest.mark.parametrize(("backend", "precision"), BUILT)
def test_draft_precision_from_the_config_chooses_the_build_the_loader_opens(builds, tiny_hf, cache, backend,
                                                                             precision, monkeypatch):
    cfg = load_config(None, overrides={"models": {"draft": str(tiny_hf), "draft_backend": backend,
                                                  "draft_precision": precision, "cache_dir": str(cache)}})
    built: list[str] = []
    real = convert.prepare_draft

    def recording_prepare(spec, backend_name, asked, **kwargs):
        folder = real(spec, backend_name, asked, **kwargs)
        built.append(folder)
        return folder

    monkeypatch.setattr(convert, "prepare_draft", recording_prepare)
    row = DeviceRow(f"{backend}:cpu", backend, "cpu", "CPU", "CPU" if backend == "openvino" else "cpu")
    drafter, choice = load_drafter(cfg, rows=[row], catalog=None)
    try:
        assert choice.row.id == row.id and not choice.fallbacks
        assert built == [builds[(backend, precision)]]  # the cached build of that precision, not the default
        assert torch.equal(run_open(drafter), run(open_build(backend, builds[(backend, precision)])))
    finally:
        drafter.close()


def open_build(backend: str, folder: Path):
    return OrtGenAIDrafter(folder, max_length=64) if backend == "onnxruntime-genai" else OpenVINODrafter(folder)


def run_open(drafter) -> torch.Tensor:
    drafter.rollback(0)
    drafter.prefill(PROMPT)
    return drafter.next_logits().float().clone()
