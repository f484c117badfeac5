"""``specd convert``: prepare a draft model for an edge backend (the building itself is
:mod:`specd.desktop.drafters.convert`)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from specd.desktop.drafters.convert import CONVERT_BACKENDS, PRECISIONS, build_ortgenai
from specd.shared.errors import ModelError
from specd.shared.models import ensure_hf_folder


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("convert", help="prepare a draft model for an edge backend",
                            description="Convert a model (preset, Hugging Face id, folder or .gguf) for an edge "
                                        "backend. Point [models] draft (or [devices.npu] model_path) at the result.")
    parser.add_argument("--backend", required=True, choices=CONVERT_BACKENDS)
    parser.add_argument("--precision", default="int4", choices=PRECISIONS, help="weight precision (default int4)")
    parser.add_argument("--model", required=True, help="preset name, Hugging Face id, model folder or .gguf file")
    parser.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    parser.add_argument("--execution-provider", default="cpu",
                        help="onnxruntime-genai only: what to build for (cpu, dml, cuda, webgpu, NvTensorRtRtx)")
    parser.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out} already exists and is not empty; choose a new --out folder")
    started = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - started:5.1f} s] {message}", file=sys.stderr, flush=True)

    hf_folder = ensure_hf_folder(args.model, progress=say)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the destination and rename, so an interrupted run leaves no half-written model.
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if args.backend == "onnxruntime-genai":
            build_ortgenai(hf_folder, scratch, args.precision, say, execution_provider=args.execution_provider)
        else:
            from specd.desktop.drafters.openvino_export import export_openvino  # needs openvino: only here

            export_openvino(hf_folder, scratch, args.precision, say)
        if out.exists():
            out.rmdir()
        os.replace(scratch, out)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    say(f"Wrote {out}")
    print(f"Use it with:  [models] draft = \"{out}\"  and  draft_backend = \"{args.backend}\"")
    return 0
