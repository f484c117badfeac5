"""Preparing draft models for the edge backends (``specd convert``, in commands/convert.py, runs this).

Every source (preset, hub id, folder, GGUF) first becomes a Hugging Face folder
(:func:`specd.shared.models.ensure_hf_folder`), then:

- ``onnxruntime-genai``: the ORT GenAI model builder (``python -m onnxruntime_genai.models.builder``),
  run as a child process so its very verbose logging stays out of the way and turns into progress lines;
- ``openvino``: :mod:`specd.desktop.drafters.openvino_export` (no optimum-intel needed).

The embedded default draft (SmolLM2-135M-Instruct) is built on first use and cached per user under
``<cache>/drafts``, atomically (a temporary folder renamed into place), so later starts load it directly.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from specd.desktop.drafters.openvino import is_openvino_folder
from specd.desktop.drafters.ortgenai import is_genai_folder
from specd.shared.errors import ModelError
from specd.shared.models import Progress, _cached, ensure_hf_folder, models_cache, resolve_source

CONVERT_BACKENDS = ("onnxruntime-genai", "openvino")
PRECISIONS = ("int4", "int8", "fp16", "fp32")
# What the ORT GenAI builder can produce for each execution provider (it lists these itself).
BUILDER_PRECISIONS = {"cpu": ("int4", "int8", "fp32"), "cuda": ("int4", "int8", "fp16", "fp32"),
                      "dml": ("int4", "fp16"), "webgpu": ("int4", "int8"), "nvtensorrtrtx": ("fp16",)}


def builder_precision(execution_provider: str, precision: str) -> str:
    """``precision`` if the builder supports it for ``execution_provider``, else the closest it does."""
    supported = BUILDER_PRECISIONS.get(execution_provider.lower())
    if not supported or precision in supported:
        return precision
    for fallback in {"fp16": ("fp32", "int8", "int4"), "fp32": ("fp16", "int8", "int4")}.get(
            precision, ("int4", "int8", "fp16", "fp32")):
        if fallback in supported:
            return fallback
    return supported[0]


def build_ortgenai(hf_folder: Path, out: Path, precision: str, say: Progress, *,
                   execution_provider: str = "cpu") -> None:
    """Run the ORT GenAI model builder on ``hf_folder`` into ``out`` (~10 s for a 135M model)."""
    if precision not in PRECISIONS:
        raise ModelError(f"ONNX Runtime GenAI precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    for module in ("onnxruntime_genai", "onnx", "onnx_ir"):
        try:
            __import__(module)
        except ImportError:
            raise ModelError(f"building an ONNX Runtime GenAI model needs the {module} package; "
                             "install specd[ortgenai]") from None
    with tempfile.TemporaryDirectory(prefix="specd-ortgenai-") as scratch:
        command = [sys.executable, "-u", "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder),
                   "-o", str(out), "-p", precision, "-e", execution_provider, "-c", scratch]
        # The builder writes a cache folder relative to its working directory: keep that in scratch too.
        _run_with_progress(command, scratch, say, f"Building the {precision} ONNX Runtime GenAI model")
    if not is_genai_folder(out):
        raise ModelError(f"the ONNX Runtime GenAI builder finished without writing {out / 'genai_config.json'}")


def _run_with_progress(command: list[str], cwd: str, say: Progress, title: str) -> None:
    """Run the builder, turning its log into a few progress lines; its tail goes into the error."""
    say(f"{title} ...")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    started = time.monotonic()
    tail: list[str] = []
    quantised = 0
    stage = ""
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            for line in re.split(r"[\r\n]", raw):
                line = line.strip()
                if not line:
                    continue
                tail = [*tail, line][-30:]
                if "start to quantize" in line:
                    quantised += 1
                    if quantised % 50 == 1:
                        say(f"  quantising weights ({quantised} matrices, {time.monotonic() - started:.0f} s)")
                new_stage = _builder_stage(line)
                if new_stage and new_stage != stage:
                    stage = new_stage
                    say(f"  {stage} ({time.monotonic() - started:.0f} s)")
        code = proc.wait()
    if code != 0:
        raise ModelError(f"the ONNX Runtime GenAI builder failed (exit {code}):\n" + "\n".join(tail[-12:]))
    say(f"  done in {time.monotonic() - started:.0f} s")


def _builder_stage(line: str) -> str:
    lowered = line.lower()
    for marker, stage in (("reading", "reading the model"), ("loading", "reading the model"),
                          ("saving genai config", "writing the runtime config"),
                          ("saving processing files", "copying the tokenizer"), ("saving", "saving the model")):
        if lowered.startswith(marker) or f"] - {marker}" in lowered:
            return stage
    return ""


def drafts_cache(cache_override: str = "") -> Path:
    return models_cache(cache_override).parent / "drafts"


def prepare_draft(spec: str, backend: str, precision: str, *, cache_override: str = "",
                  execution_provider: str = "cpu", progress: Progress | None = None) -> Path:
    """A model folder the ``backend`` drafter loads: ``spec`` itself when it already is one, otherwise
    built once from its Hugging Face folder and cached."""
    say = progress or (lambda _msg: None)
    folder = Path(spec).expanduser()
    if backend == "onnxruntime-genai" and is_genai_folder(folder):
        return folder
    if backend == "openvino" and is_openvino_folder(folder):
        return folder
    hf_folder = ensure_hf_folder(spec, cache_override=cache_override, progress=say)
    if backend == "torch":
        return hf_folder
    source = resolve_source(spec)
    digest = hashlib.sha256(str(hf_folder).encode()).hexdigest()[:10]
    tag = source.ref if source.is_embedded else f"{source.name}-{digest}"
    if backend == "onnxruntime-genai":
        precision = builder_precision(execution_provider, precision)
        target = drafts_cache(cache_override) / f"ortgenai-{tag}-{precision}-{execution_provider.lower()}"
        return _cached(target, lambda out: build_ortgenai(hf_folder, out, precision, say,
                                                          execution_provider=execution_provider),
                       say, f"Preparing the {backend} draft of {source.name} (once, ~10 s)")
    if backend == "openvino":
        from specd.desktop.drafters.openvino_export import export_openvino

        target = drafts_cache(cache_override) / f"openvino-{tag}-{precision}"
        return _cached(target, lambda out: export_openvino(hf_folder, out, precision, say), say,
                       f"Preparing the {backend} draft of {source.name} (once, ~15 s)")
    raise ModelError(f"unknown draft backend {backend!r}")
