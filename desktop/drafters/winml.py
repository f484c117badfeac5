"""The Windows ML execution-provider catalog: the one place that touches Windows-only packages.

On Windows 11, Windows ML downloads and shares hardware execution providers (Qualcomm QNN for NPUs,
DirectML and NVIDIA TensorRT-RTX for GPUs, Intel OpenVINO, AMD Vitis AI) system-wide; ONNX Runtime
GenAI can use one once its library is registered. Everything else in specd sees the catalog through
:class:`ProviderCatalog`, so probing, ranking and fallback are tested on any OS with a fake catalog.
The projection packages (``winui3-`` / ``wasdk-Microsoft.Windows.AI.MachineLearning``, both of which
install the ``winui3`` modules) are imported lazily, only on Windows. :data:`PROJECTION_API` names every
attribute of theirs this module uses; a test checks those names against the real packages' type stubs.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Protocol

from specd.shared.errors import DeviceError


@dataclass(frozen=True, slots=True)
class ProviderKind:
    """How specd uses one catalog provider with ONNX Runtime GenAI."""

    kind: str  # npu | gpu
    genai_name: str  # the name ``onnxruntime_genai.Config.append_provider`` takes
    builder_ep: str | None  # ``-e`` of the ORT GenAI model builder; None: needs a model prepared for it
    options: tuple[tuple[str, str], ...] = ()


#: The catalog providers specd knows how to use, by the name the catalog reports.
KNOWN_PROVIDERS: dict[str, ProviderKind] = {
    "QNNExecutionProvider": ProviderKind("npu", "QNN", None, (("backend_type", "htp"),)),
    "VitisAIExecutionProvider": ProviderKind("npu", "VitisAI", None),
    "OpenVINOExecutionProvider": ProviderKind("npu", "OpenVINO", None, (("device_type", "NPU"),)),
    "NvTensorRTRTXExecutionProvider": ProviderKind("gpu", "NvTensorRtRtx", "NvTensorRtRtx"),
    "DmlExecutionProvider": ProviderKind("gpu", "dml", "dml"),
}


#: The names this module uses from the Windows ML projection, by the class (or module) that has them.
PROJECTION_API: dict[str, tuple[str, ...]] = {
    "module": ("ExecutionProviderCatalog", "ExecutionProviderReadyState", "ExecutionProviderReadyResultState"),
    "ExecutionProviderCatalog": ("get_default", "find_all_providers"),
    "ExecutionProvider": ("name", "ready_state", "library_path", "ensure_ready_async"),
    "ExecutionProviderReadyResult": ("status", "diagnostic_text"),
    "ExecutionProviderReadyState": ("READY",),
    "ExecutionProviderReadyResultState": ("SUCCESS",),
}


@dataclass(frozen=True, slots=True)
class CatalogProvider:
    """One execution provider the catalog offers for this machine."""

    name: str  # e.g. "QNNExecutionProvider"
    ready: bool  # installed now; otherwise Windows ML downloads it on first use
    library_path: str = ""


class ProviderCatalog(Protocol):
    """What specd needs from the Windows ML catalog (a fake implements it in tests)."""

    def providers(self) -> list[CatalogProvider]: ...

    def ensure_ready(self, name: str) -> str:
        """Install the provider if needed; return its library path."""
        ...


class WindowsMLCatalog:
    """The real catalog, through the Windows App SDK Python projection."""

    def __init__(self) -> None:
        self._ml, self._bootstrap = _import_projection()
        self._catalog = self._ml.ExecutionProviderCatalog.get_default()
        self._found: dict[str, Any] = {}

    def providers(self) -> list[CatalogProvider]:
        rows = []
        ready_state = self._ml.ExecutionProviderReadyState
        for provider in self._catalog.find_all_providers():
            self._found[provider.name] = provider
            ready = provider.ready_state == ready_state.READY  # else NOT_READY (downloadable) or NOT_PRESENT
            rows.append(CatalogProvider(provider.name, ready, str(provider.library_path or "")))
        return rows

    def ensure_ready(self, name: str) -> str:
        if name not in self._found:
            self.providers()
        provider = self._found.get(name)
        if provider is None:
            raise DeviceError(f"Windows ML offers no {name} on this machine")
        result = provider.ensure_ready_async().get()
        # The states are IntEnums: str() gives a number on Python 3.11+, so compare members, never text.
        if result.status != self._ml.ExecutionProviderReadyResultState.SUCCESS:
            raise DeviceError(f"Windows ML could not install {name}: {result.diagnostic_text or repr(result.status)}")
        return str(provider.library_path)


def _import_projection() -> tuple[Any, Any]:
    """The Windows ML and bootstrap modules of whichever projection is installed (winui3 or wasdk)."""
    errors = []
    for prefix in ("wasdk", "winui3"):
        try:
            bootstrap = importlib.import_module(
                f"{prefix}.microsoft.windows.applicationmodel.dynamicdependency.bootstrap")
            # The Windows App SDK runtime must be bootstrapped once per process before any of its APIs.
            bootstrap.initialize()
            return importlib.import_module(f"{prefix}.microsoft.windows.ai.machinelearning"), bootstrap
        except Exception as exc:  # ImportError, or a WinRT error from the bootstrapper
            errors.append(f"{prefix}: {exc}")
    raise DeviceError("the Windows ML catalog is not usable (" + "; ".join(errors) + "); install specd[ortgenai] "
                      "on Windows 11 with the Windows App SDK runtime")


_default: ProviderCatalog | None = None
_default_error = ""


def default_catalog() -> tuple[ProviderCatalog | None, str]:
    """The machine's catalog, or None and why not (always None off Windows). Opened once per process."""
    global _default, _default_error
    if sys.platform != "win32":
        return None, "Windows ML exists only on Windows"
    if _default is None and not _default_error:
        try:
            _default = WindowsMLCatalog()
        except DeviceError as exc:
            _default_error = str(exc)
    return _default, _default_error


_registered: set[tuple[int, str]] = set()


def register_provider(catalog: ProviderCatalog, name: str, genai: Any) -> None:
    """Make provider ``name`` usable by ONNX Runtime GenAI (installing it first if needed); idempotent."""
    key = (id(genai), name)
    if key in _registered:
        return
    path = catalog.ensure_ready(name)
    try:
        genai.register_execution_provider_library(name, path)
    except Exception as exc:  # the native library raises RuntimeError with its own text
        raise DeviceError(f"ONNX Runtime GenAI could not load {name} from {path}: {exc}") from None
    _registered.add(key)
