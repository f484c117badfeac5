"""The weight precision a draft is built at: ``[models] draft_precision``, and what ``"auto"`` means.

With ``"auto"`` (the default) the precision is chosen by measurement: the candidates a device can run
(:func:`candidates`: int4 and int8 on a CPU, fp16 too on a GPU; an NPU keeps what its execution provider
needs) are built, measured against the verifier and the fastest is kept
(:mod:`specd.desktop.precision.measure` does that; it needs a verifier). This module knows what
can be built for a device, the documented per-device default used until a measurement exists
(:data:`DEFAULT_PRECISION`), and the record of a measured choice: a small JSON file beside the built
drafts, ``<cache>/drafts/precision-<draft>-<device>.json``, holding the choice, its reason and the figures.
A record is used only for the draft model, backend and device it was measured on (and, once connected,
the verifier's target: see :func:`record_target`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from specd.desktop.drafters.convert import builder_precision, drafts_cache
from specd.desktop.drafters.openvino import is_openvino_folder
from specd.desktop.drafters.ortgenai import is_genai_folder
from specd.desktop.drafters.winml import KNOWN_PROVIDERS
from specd.shared.config import Config
from specd.shared.errors import ModelError
from specd.shared.models import Progress, resolve_source

AUTO = "auto"
RECORD_FORMAT = "specd-draft-precision-1"
#: A draft folder built beforehand (``[devices.npu] model_path``, a ``specd convert`` output): used as it is.
PREPARED = "prepared"
#: Until a measurement exists. On a 2-core CPU the int8 draft made speculation 2.4–2.5× cloud-only at 0 ms
#: round trip and int4 1.29× (BENCHMARKS.md): int4 drafts no faster there and agrees with the target far
#: less often. GPUs run half precision at full speed; an NPU's compiler wants integer weights.
DEFAULT_PRECISION = {"cpu": "int8", "gpu": "fp16", "npu": "int4"}
_CANDIDATES = {"cpu": ("int4", "int8"), "gpu": ("int4", "int8", "fp16"), "npu": ("int4",)}

Source = Literal["config", "measured", "default", "only"]


class DraftDevice(Protocol):
    """What this module needs of a device row (:class:`specd.desktop.drafters.devices.DeviceRow`)."""

    id: str
    backend: str
    kind: str
    name: str
    device: str


@dataclass(frozen=True, slots=True)
class PrecisionPick:
    """The precision a draft is opened at, why, and how it was picked."""

    precision: str
    reason: str
    source: Source  # config: set explicitly; measured: a record; default: not measured yet; only: no choice


def draft_spec(row: DraftDevice, config: Config) -> str:
    """The draft model ``row`` loads: ``[devices.npu] model_path`` on an NPU when set, else ``[models] draft``."""
    if row.kind == "npu" and config.devices.npu.model_path:
        return config.devices.npu.model_path
    return config.models.draft


def builder_provider(row: DraftDevice) -> str:
    """The ORT GenAI builder's execution provider for ``row`` (``cpu`` for the CPU row)."""
    known = KNOWN_PROVIDERS.get(row.device) if row.backend == "onnxruntime-genai" else None
    return (known.builder_ep or "cpu") if known else "cpu"


def _is_prepared(row: DraftDevice, spec: str) -> bool:
    folder = Path(spec).expanduser()
    if row.backend == "onnxruntime-genai":
        known = KNOWN_PROVIDERS.get(row.device)
        return is_genai_folder(folder) or (known is not None and known.builder_ep is None)
    return row.backend == "openvino" and is_openvino_folder(folder)


def torch_precision(row: DraftDevice) -> str:
    """What the torch drafter runs the model's own weights at (fp32 on the CPU, half on a GPU)."""
    return "fp32" if row.kind == "cpu" else "fp16"


def candidates(row: DraftDevice, config: Config) -> tuple[str, ...]:
    """The precisions ``auto`` chooses between on ``row``; one when there is nothing to choose."""
    if row.backend == "torch":
        return (torch_precision(row),)
    if _is_prepared(row, draft_spec(row, config)):
        return (PREPARED,)
    wanted = _CANDIDATES.get(row.kind, ("int4",))
    if row.backend == "onnxruntime-genai":  # what the builder can make for this execution provider
        provider = builder_provider(row)
        wanted = tuple(dict.fromkeys(builder_precision(provider, p) for p in wanted))
    return wanted


def build_precision(row: DraftDevice, precision: str) -> str:
    """The precision a build for ``row`` really gets (the builder falls back where a provider lacks one)."""
    if row.backend == "onnxruntime-genai" and precision != PREPARED:
        return builder_precision(builder_provider(row), precision)
    return precision


def default_pick(row: DraftDevice, choices: tuple[str, ...]) -> PrecisionPick:
    wanted = build_precision(row, DEFAULT_PRECISION.get(row.kind, "int4"))
    precision = wanted if wanted in choices else choices[0]
    why = {"cpu": "on a 2-core CPU an int8 draft made speculation 2.4× cloud-only, int4 1.29×",
           "gpu": "GPUs run half precision at full speed", "npu": "an NPU compiles integer weights"}
    return PrecisionPick(precision, f"{precision}, the default for a {row.kind.upper()} draft until it is measured "
                                    f"against a verifier ({why.get(row.kind, 'no measurement yet')})", "default")


def pick_precision(row: DraftDevice, config: Config, progress: Progress | None = None, *,
                   read_only: bool = False) -> PrecisionPick:
    """The precision to open the draft at on ``row`` now: the config's, the measured one, or the default.
    ``read_only`` (``specd devices``): a corrupt record is only reported in the reason, not removed."""
    asked = config.models.draft_precision
    choices = candidates(row, config)
    if row.backend == "torch":
        return PrecisionPick(choices[0], f"{choices[0]}: the torch backend runs the model's own weights "
                                         "([models] draft_precision applies to built drafts)", "only")
    if choices == (PREPARED,):
        return PrecisionPick(PREPARED, f"{PREPARED}: a draft folder built beforehand, used as it is", "only")
    if asked != AUTO:
        built = build_precision(row, asked)
        note = "" if built == asked else f" (built {built}: the {builder_provider(row)} builder has no {asked})"
        return PrecisionPick(built, f'{built}: [models] draft_precision = "{asked}" is set{note}', "config")
    if len(choices) == 1:
        return PrecisionPick(choices[0], f"{choices[0]}: the only precision {row.name} runs", "only")
    path = record_path(row, config)
    try:
        record = load_record(path) if read_only else read_record(path, progress)
    except CorruptRecord as exc:
        fallback = default_pick(row, choices)
        return replace(fallback, reason=f"{fallback.reason}; {exc}")
    if record is not None and record_matches(record, row, config, choices):
        return PrecisionPick(record["precision"], record["reason"], "measured")
    return default_pick(row, choices)


# -- the record of a measured choice -------------------------------------------------------------
def record_path(row: DraftDevice, config: Config) -> Path:
    """``<cache>/drafts/precision-<draft>-<device>.json``, beside the drafts it chose between."""
    source = resolve_source(draft_spec(row, config))
    digest = hashlib.sha256(f"{source.kind}:{source.ref}".encode()).hexdigest()[:10]
    tag = source.ref if source.is_embedded else f"{source.name}-{digest}"
    device = re.sub(r"[^A-Za-z0-9.-]+", "_", row.id)
    return drafts_cache(config.models.cache_dir) / f"precision-{tag}-{device}.json"


def record_identity(row: DraftDevice, config: Config) -> dict[str, str]:
    """What a record is valid for, besides the target: the draft model, its backend and the device."""
    source = resolve_source(draft_spec(row, config))
    return {"draft": f"{source.kind}:{source.ref}", "backend": row.backend, "device": row.id,
            "device_name": row.name}


def record_target(model: str, tokenizer: str) -> str:
    """The verifier's target as a record names it: the model it announces and its tokenizer's fingerprint."""
    return f"{model} (tokenizer {tokenizer})"


def record_matches(record: dict[str, Any], row: DraftDevice, config: Config, choices: tuple[str, ...]) -> bool:
    """Measured for this draft model, backend and device, among today's candidates."""
    identity = record_identity(row, config)
    return (all(record.get(key) == value for key, value in identity.items())
            and record.get("precision") in choices)


class CorruptRecord(ModelError):
    """A precision record that cannot be read; its message names the file."""


def load_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, None when there is none; :class:`CorruptRecord` when it is unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptRecord(f"the draft precision record {path} cannot be read: {exc.strerror}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptRecord(f"the draft precision record {path} is not valid JSON ({exc})") from None
    fields = ("precision", "reason", "target", "draft", "backend", "device", "device_name")
    if (not isinstance(record, dict) or record.get("format") != RECORD_FORMAT
            or not all(isinstance(record.get(key), str) for key in fields)):
        raise CorruptRecord(f"the draft precision record {path} is not a {RECORD_FORMAT} record "
                            f"(it needs the string fields {', '.join(fields)})")
    return record


def read_record(path: Path, progress: Progress | None = None) -> dict[str, Any] | None:
    """:func:`load_record`, with a corrupt record reported (naming the file) and removed, so the precision
    is measured again and the record rewritten."""
    try:
        return load_record(path)
    except CorruptRecord as exc:
        (progress or (lambda _msg: None))(f"{exc}; removing it, the draft precision will be measured again")
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as unlink_error:
            raise CorruptRecord(f"{exc}, and it cannot be removed: {unlink_error.strerror}") from None
        return None


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write atomically (a temporary file renamed into place), so a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as fh:
            json.dump({"format": RECORD_FORMAT, **record}, fh, indent=2)
            fh.write("\n")
        os.replace(scratch, path)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
