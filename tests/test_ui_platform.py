"""specd-desktop on Linux checks that Qt's xcb platform can load before it creates the application:
missing X libraries are named with their Debian packages and the app exits with a message instead of
Qt's abort (exit code 134). Platforms that do not use xcb are left alone. The README and the Makefile
list the packages that the real plugin needs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specd.desktop.ui.qt_platform import (
    debian_package,
    missing_libraries,
    platform_problem,
    xcb_plugin_path,
    xcb_would_be_used,
)

ROOT = Path(__file__).resolve().parent.parent
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Qt uses xcb on Linux only")


@pytest.mark.parametrize(("platform", "env", "used"), [
    ("linux", {}, True),
    ("linux", {"QT_QPA_PLATFORM": "xcb"}, True),
    ("linux", {"QT_QPA_PLATFORM": "xcb:nomitshm"}, True),
    ("linux", {"QT_QPA_PLATFORM": "offscreen"}, False),
    ("linux", {"QT_QPA_PLATFORM": "wayland;xcb"}, False),
    ("linux", {"WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "wayland"}, False),
    ("linux", {"WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "x11"}, True),
    ("win32", {"QT_QPA_PLATFORM": "xcb"}, False),
    ("darwin", {}, False),
])
def test_only_platforms_that_use_xcb_are_checked(platform, env, used):
    assert xcb_would_be_used(env, platform) is used
    if not used:
        assert platform_problem(env, platform) is None


@pytest.mark.parametrize(("soname", "package"), [
    ("libxcb-icccm.so.4", "libxcb-icccm4"), ("libxcb-keysyms.so.1", "libxcb-keysyms1"),
    ("libxcb-cursor.so.0", "libxcb-cursor0"), ("libxkbcommon-x11.so.0", "libxkbcommon-x11-0"),
    ("libX11-xcb.so.1", "libx11-xcb1"), ("libEGL.so.1", "libegl1"), ("libdbus-1.so.3", "libdbus-1-3"),
    ("libglib-2.0.so.0", "libglib2.0-0"), ("libxcb-render-util.so.0.0.0", "libxcb-render-util0"),
])
def test_debian_package_of_a_library(soname, package):
    assert debian_package(soname) == package


def build_plugin(folder: Path, missing: list[str]) -> Path:
    """A shared object named like Qt's xcb plugin that needs ``missing`` (built, then deleted)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a plugin with missing libraries")
    (folder / "stub.c").write_text("int specd_stub(void) { return 1; }\n")
    (folder / "plugin.c").write_text("int specd_plugin(void) { return 2; }\n")
    for name in missing:
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(folder / name), str(folder / "stub.c"),
                        f"-Wl,-soname,{name}"], check=True)
    plugins = folder / "platforms"
    plugins.mkdir()
    plugin = plugins / "libqxcb.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(plugin), str(folder / "plugin.c"), f"-L{folder}",
                    "-Wl,--no-as-needed", *[f"-l:{name}" for name in missing]], check=True)
    for name in missing:
        (folder / name).unlink()
    return plugin


@needs_linux
def test_every_missing_library_is_found(tmp_path):
    plugin = build_plugin(tmp_path, ["libspecd-absent.so.4", "libspecdgone.so.1"])
    assert missing_libraries(plugin) == ["libspecd-absent.so.4", "libspecdgone.so.1"]
    problem = platform_problem({"QT_QPA_PLATFORM": "xcb", "QT_QPA_PLATFORM_PLUGIN_PATH": str(plugin.parent),
                                "DISPLAY": ":0"}, "linux")
    assert problem is not None and "libspecd-absent.so.4, libspecdgone.so.1" in problem
    assert "sudo apt-get install libspecd-absent4 libspecdgone1" in problem


def run_desktop(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    clean.update(XDG_STATE_HOME=str(tmp_path / "state"), XDG_CONFIG_HOME=str(tmp_path / "config"),
                 XDG_CACHE_HOME=str(tmp_path / "cache"), **env)
    return subprocess.run([sys.executable, "-m", "specd.desktop.ui.app", "--no-tray"], env=clean,
                          capture_output=True, text=True, timeout=120)


@needs_linux
def test_specd_desktop_names_missing_libraries_and_exits(tmp_path):
    plugin = build_plugin(tmp_path, ["libxcb-specd-icccm.so.4"])
    result = run_desktop(tmp_path, QT_QPA_PLATFORM="xcb", QT_QPA_PLATFORM_PLUGIN_PATH=str(plugin.parent),
                         DISPLAY=":0")
    assert result.returncode == 1, result.stderr  # not Qt's abort (134)
    assert "specd-desktop: cannot start: Qt's X11 platform plugin" in result.stderr
    assert "libxcb-specd-icccm.so.4" in result.stderr and "apt-get install libxcb-specd-icccm4" in result.stderr
    logs = list((tmp_path / "state").rglob("specd-desktop.log"))
    assert logs and "libxcb-specd-icccm.so.4" in logs[0].read_text()  # and it is in the log, too


@needs_linux
def test_specd_desktop_without_an_x_display_says_so(tmp_path):
    plugin = build_plugin(tmp_path, [])
    result = run_desktop(tmp_path, QT_QPA_PLATFORM="xcb", QT_QPA_PLATFORM_PLUGIN_PATH=str(plugin.parent))
    assert result.returncode == 1 and "there is no X display (DISPLAY is not set)" in result.stderr


def listed_packages(text: str, start: str) -> list[str]:
    return re.findall(r"`(lib[^`]+)`", text[text.index(start):].split("\n\n")[0])


@needs_linux
def test_readme_and_makefile_list_what_the_real_plugin_needs():
    makefile = (ROOT / "Makefile").read_text()
    make_list = re.search(r"^DESKTOP_DEBS := (.*?)\n\n", makefile, re.M | re.S).group(1)
    make_packages = re.findall(r"lib[\w.+-]+", make_list)
    readme_packages = listed_packages((ROOT / "README.md").read_text(), "Linux packages")
    assert sorted(readme_packages) == sorted(make_packages)
    plugin = xcb_plugin_path({})
    if shutil.which("ldd") is None or plugin is None or not plugin.is_file():
        pytest.skip("no ldd or no PySide6 xcb plugin here")
    out = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"^\s*(lib(?:xcb|X11|xkbcommon|EGL|GL|fontconfig|dbus)[^\s]*)\s*=>", out, re.M))
    assert {"libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libxcb-cursor.so.0"} <= needed
    assert {debian_package(name) for name in needed} - set(make_packages) <= {"libglx0", "libgldispatch0"}
