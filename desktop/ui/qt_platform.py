"""Can Qt open a window here? Checked before the QApplication exists, because when Qt's xcb (X11)
platform plugin cannot load, Qt aborts the process (exit code 134) with advice that is often wrong.

On Linux the xcb plugin needs a dozen X libraries that slim installs lack (``libxcb-icccm4``,
``libxcb-keysyms1``, …). ``ldd`` on the plugin names every one that is missing; the message lists them
with the Debian/Ubuntu packages that provide them. Windows, macOS and the offscreen or Wayland
platforms are not checked: xcb is not used there. No Qt here (importing Qt's GUI would be too late).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

XCB_PLUGIN = "libqxcb.so"
# Sonames whose Debian package name does not follow the usual rule (libfoo.so.1 → libfoo1).
PACKAGE_EXCEPTIONS = {"libglib-2.0.so.0": "libglib2.0-0", "libgthread-2.0.so.0": "libglib2.0-0",
                      "libz.so.1": "zlib1g", "libbrotlidec.so.1": "libbrotli1", "libbrotlicommon.so.1": "libbrotli1"}


def xcb_would_be_used(env: Mapping[str, str] = os.environ, platform: str = sys.platform) -> bool:
    """Whether Qt would load the xcb plugin: on Linux/BSD, when ``QT_QPA_PLATFORM`` asks for it, or
    when it is unset outside a Wayland session (there Qt tries its Wayland plugin first)."""
    if not platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
        return False
    requested = env.get("QT_QPA_PLATFORM", "").strip()
    if requested:
        return requested.split(";")[0].split(":")[0].strip() == "xcb"
    return not (env.get("WAYLAND_DISPLAY") and env.get("XDG_SESSION_TYPE", "").lower() == "wayland")


def xcb_plugin_path(env: Mapping[str, str] = os.environ) -> Path | None:
    """The plugin Qt would load: from ``QT_QPA_PLATFORM_PLUGIN_PATH`` when set, else PySide6's own."""
    override = env.get("QT_QPA_PLATFORM_PLUGIN_PATH", "").strip()
    if override:
        return Path(override) / XCB_PLUGIN
    spec = importlib.util.find_spec("PySide6")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "Qt" / "plugins" / "platforms" / XCB_PLUGIN


def missing_libraries(plugin: Path) -> list[str]:
    """The shared libraries ``plugin`` needs that the dynamic loader cannot find (all of them with
    ``ldd``; without it, the first one the loader reports)."""
    ldd = shutil.which("ldd")
    if ldd is not None:
        try:
            out = subprocess.run([ldd, str(plugin)], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None:
            found = re.findall(r"^\s*(\S+)\s*=>\s*not found", out, re.M)
            return list(dict.fromkeys(found))
    try:
        ctypes.CDLL(str(plugin))
    except OSError as exc:
        match = re.search(r"(\S+\.so[.\d]*): cannot open shared object file", str(exc))
        return [match.group(1)] if match else [str(exc)]
    return []


def debian_package(soname: str) -> str:
    """The Debian/Ubuntu package that usually ships ``soname``: libxcb-icccm.so.4 → libxcb-icccm4."""
    if soname in PACKAGE_EXCEPTIONS:
        return PACKAGE_EXCEPTIONS[soname]
    match = re.fullmatch(r"(lib.+?)\.so\.(\d+)(?:\.\d+)*", soname)
    if not match:
        return soname
    name, version = match.group(1).lower(), match.group(2)
    return f"{name}-{version}" if name[-1].isdigit() else f"{name}{version}"


def platform_problem(env: Mapping[str, str] = os.environ, platform: str = sys.platform) -> str | None:
    """Why Qt cannot open a window here, as a message for the user; None when nothing stands in the way."""
    if not xcb_would_be_used(env, platform):
        return None
    plugin = xcb_plugin_path(env)
    if plugin is None or not plugin.is_file():
        return (f"cannot start: Qt's X11 platform plugin is missing ({plugin or XCB_PLUGIN}); "
                "reinstall PySide6")
    missing = missing_libraries(plugin)
    if missing:
        packages = " ".join(dict.fromkeys(debian_package(name) for name in missing))
        return (f"cannot start: Qt's X11 platform plugin ({plugin}) cannot load, because these "
                f"libraries are missing: {', '.join(missing)}.\n"
                f"On Debian or Ubuntu install them with: sudo apt-get install {packages}\n"
                "(On Wayland, QT_QPA_PLATFORM=wayland uses Qt's Wayland plugin instead.)")
    if not env.get("DISPLAY"):
        return ("cannot start: there is no X display (DISPLAY is not set). Start it from a "
                "desktop session, or set QT_QPA_PLATFORM=wayland on a Wayland desktop.")
    return None
