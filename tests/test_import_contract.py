"""The import contract between the packages: what each may depend on, checked on the source.

``shared/`` loads no websockets, Qt or transformers, and ``shared/protocol/`` not even torch;
``daemon/`` and ``desktop/`` never import each other; Qt appears only under ``desktop/ui/``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"shared": "specd.shared", "daemon": "specd.daemon", "desktop": "specd.desktop"}
QT = ("PySide6", "qasync", "shiboken6")


def _modules(folder: str) -> list[tuple[Path, str]]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found.append((path, ".".join([PACKAGES[folder], *parts])))
    return found


def _imports(path: Path) -> set[str]:
    """Every module an import statement names, at any depth (function-level imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _loaded_by(modules: list[str], watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` are in ``sys.modules`` after importing ``modules`` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            f"print(json.dumps(sorted(w for w in {watched!r} if w in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_shared_loads_no_websockets_qt_or_transformers():
    modules = [name for _path, name in _modules("shared")]
    assert "specd.shared.protocol.server" in modules and "specd.shared.sampling" in modules
    assert _loaded_by(modules, ("websockets", "transformers", *QT)) == []


def test_the_protocol_package_loads_no_torch():
    modules = [name for _path, name in _modules("shared") if name.startswith("specd.shared.protocol")]
    assert len(modules) >= 5
    assert _loaded_by(modules, ("torch", "numpy")) == []


@pytest.mark.parametrize("folder,other", [("daemon", "desktop"), ("desktop", "daemon"), ("shared", "daemon"),
                                          ("shared", "desktop")])
def test_packages_import_only_downwards(folder, other):
    for path, _name in _modules(folder):
        wrong = sorted(n for n in _imports(path) if n == PACKAGES[other] or n.startswith(PACKAGES[other] + "."))
        assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"


def test_qt_only_under_desktop_ui():
    checked = 0
    for folder in PACKAGES:
        for path, name in _modules(folder):
            if name.startswith("specd.desktop.ui"):
                continue
            checked += 1
            qt = sorted(n for n in _imports(path) if n.split(".")[0] in QT)
            assert not qt, f"{path.relative_to(ROOT)} imports {qt}: Qt belongs under desktop/ui/"
    assert checked > 40
