"""Which devices of this machine can run the draft model: probing, ranking and the choice record.

Probing returns plain :class:`DeviceRow` data from four sources — torch CUDA (with the NVIDIA
management library for names, memory and driver), OpenVINO's ``available_devices``, the Windows ML
execution-provider catalog (Windows only, through :mod:`specd.desktop.drafters.winml`) and the CPU, which is
always there (one row per installed backend). Ranking is NPU > GPU > CPU, changed by the config's
``[devices]`` section; :func:`plan_devices` turns the rows into the ordered list the loader tries, and
:class:`DeviceChoice` records where the draft ended up and why better devices were passed over.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

from specd.desktop.drafters.winml import KNOWN_PROVIDERS, ProviderCatalog, default_catalog
from specd.shared.config import Config

KINDS = ("npu", "gpu", "cpu")
# Within one kind, the backend tried first: the fastest for a small draft on that kind of device.
BACKEND_ORDER = {
    "npu": ("onnxruntime-genai", "openvino"),
    "gpu": ("torch", "onnxruntime-genai", "openvino"),
    "cpu": ("onnxruntime-genai", "openvino", "torch"),
}
DEFAULT_CATALOG: Any = object()  # sentinel: use the machine's Windows ML catalog
WINDOWS_ML_ROW = "onnxruntime-genai:windows-ml"  # the row of a Windows ML catalog that cannot open


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """One (backend, device) pair that could run the draft model."""

    id: str  # "<backend>:<device>", e.g. "torch:cuda:0", "openvino:NPU", "onnxruntime-genai:cpu"
    backend: str  # torch | onnxruntime-genai | openvino
    kind: str  # npu | gpu | cpu
    name: str  # human name, e.g. "NVIDIA GeForce RTX 4060 Laptop GPU"
    device: str  # what the backend is given: "cuda:0", "NPU", "GPU.1", "cpu", a Windows ML provider name
    memory_bytes: int | None = None
    available: bool = True
    reason: str = ""  # why not available
    best: bool = False  # the first device the loader will try
    detail: str = ""  # e.g. the driver version

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Fallback:
    """A device that was wanted or tried and could not run the draft."""

    device: str  # a row id, or what was requested ("npu", "openvino:GPU.1")
    reason: str


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    """Where the draft runs, what was asked for, and why better devices were passed over."""

    row: DeviceRow
    requested: str  # "auto", a kind or a row id
    fallbacks: tuple[Fallback, ...] = ()

    @property
    def fell_back(self) -> bool:
        return bool(self.fallbacks)

    def summary(self) -> str:
        text = f"draft on {self.row.name} ({self.row.id})"
        if self.fallbacks:
            text += "; fell back from " + "; ".join(f"{f.device}: {f.reason}" for f in self.fallbacks)
        return text

    def to_json(self) -> dict[str, Any]:
        return {"device": self.row.to_json(), "requested": self.requested,
                "fallbacks": [asdict(f) for f in self.fallbacks]}


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """The rows to try, in order, and the requested devices already known to be unusable."""

    candidates: list[DeviceRow]
    requested: str
    fallbacks: list[Fallback]


# -- probing ------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def probe_torch() -> list[DeviceRow]:
    import torch

    rows = [DeviceRow("torch:cpu", "torch", "cpu", cpu_name(), "cpu")]
    nvml = _nvml_gpus()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        info = nvml.get(index, {})
        rows.append(DeviceRow(f"torch:cuda:{index}", "torch", "gpu", props.name, f"cuda:{index}",
                              memory_bytes=int(info.get("memory", props.total_memory)),
                              detail=info.get("driver", "")))
    if count == 0:
        why = ("this torch is a CPU-only build; install a CUDA build of torch" if torch.version.cuda is None
               else "torch cannot use the CUDA driver")
        for index, info in sorted(nvml.items()):
            rows.append(DeviceRow(f"torch:cuda:{index}", "torch", "gpu", info["name"], f"cuda:{index}",
                                  memory_bytes=info["memory"], available=False, reason=why,
                                  detail=info.get("driver", "")))
    return rows


def _nvml_gpus() -> dict[int, dict[str, Any]]:
    """NVIDIA GPUs as the management library sees them (name, memory, driver); empty without it."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / no NVIDIA GPU: NVMLError
        return {}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus[index] = {"name": name.decode() if isinstance(name, bytes) else str(name),
                           "memory": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                           "driver": f"driver {driver.decode() if isinstance(driver, bytes) else driver}"}
        return gpus
    except Exception:
        return {}
    finally:
        pynvml.nvmlShutdown()


def probe_openvino() -> list[DeviceRow]:
    if not _has("openvino"):
        return []
    try:
        import openvino as ov

        core = ov.Core()
        devices = list(core.available_devices)
    except Exception as exc:  # a broken install or plugin
        return [DeviceRow("openvino:CPU", "openvino", "cpu", cpu_name(), "CPU", available=False,
                          reason=f"OpenVINO does not start: {exc}")]
    rows = []
    for device in devices:
        kind = device.split(".")[0].lower()
        if kind not in KINDS:
            continue
        name = _ov_property(core, device, "FULL_DEVICE_NAME") or device
        memory = _ov_property(core, device, f"{kind.upper()}_DEVICE_TOTAL_MEM_SIZE") if kind != "cpu" else None
        rows.append(DeviceRow(f"openvino:{device}", "openvino", kind, str(name), device,
                              memory_bytes=int(memory) if memory else None))
    return rows


def _ov_property(core: Any, device: str, name: str) -> Any:
    try:
        return core.get_property(device, name)
    except Exception:  # unsupported property on this plugin
        return None


def probe_ortgenai(catalog: ProviderCatalog | None, catalog_error: str = "") -> list[DeviceRow]:
    installed = _has("onnxruntime_genai")
    rows = []
    if installed:
        rows.append(DeviceRow("onnxruntime-genai:cpu", "onnxruntime-genai", "cpu", cpu_name(), "cpu"))
    if catalog is None and catalog_error and sys.platform == "win32":
        # A Windows PC whose Windows ML catalog cannot open (no Windows App SDK runtime, Windows 10): its NPU
        # and GPU providers are out of reach, and the row says why rather than the probe failing.
        rows.append(DeviceRow(WINDOWS_ML_ROW, "onnxruntime-genai", "npu", "Windows ML execution providers",
                              "windows-ml", available=False, reason=catalog_error))
    for provider in catalog.providers() if catalog is not None else []:
        known = KNOWN_PROVIDERS.get(provider.name)
        if known is None:
            continue
        reason = "" if installed else "install specd[ortgenai] (onnxruntime-genai-winml)"
        detail = "ready" if provider.ready else "Windows ML installs it on first use"
        rows.append(DeviceRow(f"onnxruntime-genai:{known.genai_name.lower()}", "onnxruntime-genai", known.kind,
                              f"{provider.name} (Windows ML)", provider.name, available=installed, reason=reason,
                              detail=detail))
    return rows


def probe_devices(config: Config | None = None, *, catalog: Any = DEFAULT_CATALOG) -> list[DeviceRow]:
    """Every device row of this machine, config applied, ranked, with ``best`` on the first to try."""
    config = config or Config()
    catalog_error = ""
    if catalog is DEFAULT_CATALOG:
        catalog, catalog_error = default_catalog()
    rows = probe_torch() + probe_openvino() + probe_ortgenai(catalog, catalog_error)
    rows = [_apply_config(row, config) for row in rows]
    plan = plan_devices(rows, config)
    best = plan.candidates[0].id if plan.candidates else None
    rows = [replace(row, best=row.id == best) for row in rows]
    return sorted(rows, key=lambda row: _rank(row))


def _gpu_index(row: DeviceRow) -> int | None:
    """The GPU number of a row (cuda:N, GPU.N; a lone GPU is 0), or None when it has none."""
    tail = row.device.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    if row.backend == "torch" or row.device.upper().startswith("GPU"):
        return int(tail) if tail.isdigit() else 0
    return None


def _apply_config(row: DeviceRow, config: Config) -> DeviceRow:
    devices = config.devices
    if row.kind == "gpu" and not devices.gpu.enabled:
        return replace(row, available=False, reason="disabled in config ([devices.gpu] enabled = false)")
    if row.kind == "npu" and not devices.npu.enabled:
        return replace(row, available=False, reason="disabled in config ([devices.npu] enabled = false)")
    known = KNOWN_PROVIDERS.get(row.device) if row.backend == "onnxruntime-genai" else None
    if known and known.builder_ep is None and not (row.kind == "npu" and devices.npu.model_path):
        return replace(row, available=False, reason="needs a draft model built for it: set [devices.npu] "
                                                    "model_path to an ONNX Runtime GenAI folder prepared for it")
    index = _gpu_index(row) if row.kind == "gpu" else None
    if row.available and index is not None and index != devices.gpu.device_id:
        return replace(row, available=False,
                       reason=f"not the configured GPU ([devices.gpu] device_id = {devices.gpu.device_id})")
    return row


def _rank(row: DeviceRow, first_kind: str | None = None) -> tuple[int, int, int, str]:
    kind_rank = KINDS.index(row.kind)
    if first_kind in KINDS and row.kind == first_kind:
        kind_rank = -1
    backends = BACKEND_ORDER[row.kind]
    backend_rank = backends.index(row.backend) if row.backend in backends else len(backends)
    return (kind_rank, backend_rank, 0 if row.available else 1, row.id)


# -- choosing -----------------------------------------------------------------------------------
def plan_devices(rows: list[DeviceRow], config: Config, requested: str | None = None) -> DevicePlan:
    """The usable rows in the order to try them, for ``requested`` (a row id, a kind, "auto"; None:
    the config's ``[devices] edge_device``), restricted to ``[models] draft_backend`` unless "auto"."""
    wanted = (requested or config.devices.edge_device or "auto").strip()
    backend = config.models.draft_backend
    usable = [r for r in rows if r.available and (backend == "auto" or r.backend == backend)]
    fallbacks: list[Fallback] = []
    if wanted in ("auto", *KINDS):
        first_kind = None if wanted == "auto" else wanted
        ordered = sorted(usable, key=lambda r: _rank(r, first_kind))
        if first_kind and not any(r.kind == first_kind for r in ordered):
            fallbacks.append(Fallback(first_kind, _why_no_kind(rows, first_kind, backend)))
        return DevicePlan(ordered, wanted, fallbacks)
    exact = next((r for r in rows if r.id.lower() == wanted.lower()), None)
    if exact is None:
        known = ", ".join(r.id for r in rows) or "none"
        fallbacks.append(Fallback(wanted, f"no such device here (known: {known})"))
    elif exact not in usable:
        reason = exact.reason or f"[models] draft_backend = {backend!r} excludes it"
        fallbacks.append(Fallback(exact.id, reason))
    rest = sorted((r for r in usable if r is not exact), key=lambda r: _rank(r, exact.kind if exact else None))
    return DevicePlan(([exact] if exact in usable else []) + rest, wanted, fallbacks)


def _why_no_kind(rows: list[DeviceRow], kind: str, backend: str) -> str:
    rows_of_kind = [r for r in rows if r.kind == kind]
    if not rows_of_kind:
        return f"no {kind.upper()} found on this machine"
    reasons = [f"{r.id}: {r.reason}" for r in rows_of_kind if r.reason]
    if reasons:
        return "; ".join(reasons)
    return f"[models] draft_backend = {backend!r} has no {kind.upper()} here"


# -- presenting ---------------------------------------------------------------------------------
def format_memory(size: int | None) -> str:
    return "" if not size else f"{size / 2**30:.1f} GiB"


def format_table(rows: list[DeviceRow], precisions: dict[str, Any] | None = None) -> str:
    """The rows as a table; ``precisions`` (row id → :class:`~specd.desktop.precision.choice.PrecisionPick`)
    adds the draft precision each row would load, and why for the best one."""
    precisions = precisions or {}
    header = ("", "ID", "KIND", "NAME", "MEMORY", "PRECISION", "STATUS")
    lines = [header]
    for row in rows:
        status = "available" if row.available else f"unavailable: {row.reason}"
        if row.detail:
            status += f" ({row.detail})"
        pick = precisions.get(row.id)
        precision = f"{pick.precision} ({pick.source})" if pick else ""
        lines.append(("*" if row.best else "", row.id, row.kind, row.name, format_memory(row.memory_bytes),
                      precision, status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
            for line in lines]
    notes = ["* the device the draft model is loaded on first"]
    best = next((precisions[row.id] for row in rows if row.best and row.id in precisions), None)
    if best is not None:
        notes.append(f"  draft precision there: {best.reason}")
    return "\n".join(t.rstrip() for t in text) + "\n" + "\n".join(notes)
