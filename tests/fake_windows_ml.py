"""A fake of the Windows ML projection module (``winui3.microsoft.windows.ai.machinelearning``), which
exists only on Windows. Thin on purpose: the classes, members and states specd uses, with the shapes the
real type stubs give them (IntEnum states, an async operation with ``get()``). The Windows installer
test checks these names against the real package's stubs (``specd.desktop.drafters.winml.PROJECTION_API``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar


class ExecutionProviderReadyState(enum.IntEnum):
    READY = 0
    NOT_READY = 1
    NOT_PRESENT = 2


class ExecutionProviderReadyResultState(enum.IntEnum):
    IN_PROGRESS = 0
    SUCCESS = 1
    FAILURE = 2


@dataclass
class ExecutionProviderReadyResult:
    status: ExecutionProviderReadyResultState
    diagnostic_text: str = ""


@dataclass
class _Operation:
    result: ExecutionProviderReadyResult

    def get(self) -> ExecutionProviderReadyResult:
        return self.result


@dataclass
class ExecutionProvider:
    name: str
    ready_state: ExecutionProviderReadyState
    library_path: str = ""
    install_result: ExecutionProviderReadyResultState = ExecutionProviderReadyResultState.SUCCESS
    installed_path: str = ""

    def ensure_ready_async(self) -> _Operation:
        if self.install_result == ExecutionProviderReadyResultState.SUCCESS:
            self.library_path = self.installed_path or self.library_path
            self.ready_state = ExecutionProviderReadyState.READY
            return _Operation(ExecutionProviderReadyResult(self.install_result))
        return _Operation(ExecutionProviderReadyResult(self.install_result, f"download of {self.name} failed"))


@dataclass
class ExecutionProviderCatalog:
    offered: list[ExecutionProvider] = field(default_factory=list)

    default: ClassVar[ExecutionProviderCatalog | None] = None  # what get_default() returns; set by the test

    @classmethod
    def get_default(cls) -> ExecutionProviderCatalog:
        assert cls.default is not None, "set fake_windows_ml.ExecutionProviderCatalog.default first"
        return cls.default

    def find_all_providers(self) -> list[ExecutionProvider]:
        return list(self.offered)
