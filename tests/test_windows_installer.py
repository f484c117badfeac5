"""The Windows installer, built on Linux and used under Wine as a user would on Windows: built by
packaging/windows/build_on_linux.sh (as `make package-windows`, reusing its build), installed silently
into a fresh Wine prefix, its CLI and app run, a chat checked token for token against the Linux client
on a verifier on 127.0.0.1, then uninstalled.

What this proves: the bundle, the installer and uninstaller, the imports of every Windows package (the
Windows ML projection included), the CLI and the Qt rendering. What it cannot: NPU and GPU execution
providers on real hardware. Skipped only where Wine cannot be installed (not Linux, or no apt-get as
root). The build is `make package-windows`'s, kept in its cache under the hash of its inputs: the first
run on a machine builds it (about 15 minutes on two cores, Wine's Debian packages included), later runs
of this check, of `make test` or of `make package-windows` reuse it.
"""

from __future__ import annotations

import ast
import getpass
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from specd.desktop.drafters import winml
from specd.desktop.drafters.devices import WINDOWS_ML_ROW
from tests import fake_windows_ml
from tests.daemon_process import DaemonProcess

ROOT = Path(__file__).resolve().parents[1]
WINDOWS = ROOT / "packaging" / "windows"
RUN = WINDOWS / "wine" / "run.sh"
PROMPT = "Name three colours."

# The first test's setup builds the installer when none is cached: more than the suite's per-test limit.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600),
              pytest.mark.skipif(sys.platform != "linux", reason="Wine runs on Linux")]


def windows_cache() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "specd-windows-build"
    return Path(os.environ.get("SPECD_WINDOWS_CACHE", default))


def why_no_wine() -> str:
    if shutil.which("wine") or (os.geteuid() == 0 and shutil.which("apt-get")):
        return ""
    return "Wine is not installed and cannot be (apt-get as root is needed for Debian's wine, wine32:i386)"


def winpath(path: Path) -> str:
    return "Z:" + str(path.resolve()).replace("/", "\\")


@pytest.fixture(scope="module")
def installer() -> Path:
    if reason := why_no_wine():
        pytest.skip(reason)
    build = subprocess.run(["make", "--no-print-directory", "package-windows"], cwd=ROOT, capture_output=True,
                           text=True, timeout=3600)
    if build.returncode != 0 and "apt-get could not install" in build.stderr:
        lines = [line for line in build.stderr.splitlines()
                 if line.strip() and not (line.startswith("make") and "***" in line)]
        pytest.skip(lines[-1])
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    setup = ROOT / "dist" / f"specd-desktop-{version}-setup.exe"
    assert setup.is_file(), build.stdout[-2000:]
    return setup


class Prefix:
    """A fresh Wine prefix, and Windows programs run in it through packaging/windows/wine/run.sh."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.app = folder / "drive_c" / "users" / getpass.getuser() / "AppData" / "Local" / "Programs" / "specd"

    def run(self, program: Path | str, *args: str, display: bool = False, timeout: int = 600) -> str:
        program = winpath(program) if isinstance(program, Path) else program
        env = {**os.environ, "WINE_DISPLAY": "1" if display else "0", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(["bash", str(RUN), str(self.folder), program, *args], env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"{program} {' '.join(args)} exited {done.returncode}:\n{done.stdout[-4000:]}"
        return done.stdout


@pytest.fixture(scope="module")
def prefix(installer, tmp_path_factory) -> Prefix:
    prefix = Prefix(tmp_path_factory.mktemp("wine") / "prefix")
    log = prefix.folder.parent / "install.log"
    prefix.run(installer, "/VERYSILENT", "/SUPPRESSMSGBOXES", "/CURRENTUSER", "/NORESTART", f"/LOG={winpath(log)}",
               display=True)
    assert (prefix.app / "specd.exe").is_file() and (prefix.app / "specd-desktop.exe").is_file(), log.read_text()
    return prefix


def json_in(output: str) -> object:
    """The JSON document a program printed, after whatever Wine, the runtimes and the program said first
    (`specd chat` prints its answer, then the JSON on the last line; a line such as "[connected] ..." is not
    JSON)."""
    starts = [0] + [i + 1 for i, char in enumerate(output) if char == "\n"]
    for start in starts:
        if output[start:start + 1] in ("[", "{"):
            try:
                return json.JSONDecoder().raw_decode(output[start:])[0]
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON document in the output:\n{output[-3000:]}")


def test_the_installer_puts_the_bundle_and_its_cpp_runtime_in_place(prefix):
    internal = prefix.app / "_internal"
    for dll in ("msvcp140.dll", "msvcp140_atomic_wait.dll", "concrt140.dll"):
        assert (internal / dll).is_file(), f"{dll} is not in the bundle"
    assert (prefix.app / "unins000.exe").is_file()


def test_installed_specd_devices_reports_the_cpu_and_why_windows_ml_is_unavailable(prefix):
    rows = {row["id"]: row for row in json_in(prefix.run(prefix.app / "specd.exe", "devices", "--json"))}
    assert rows["onnxruntime-genai:cpu"]["available"] is True
    assert rows["onnxruntime-genai:cpu"]["best"] is True
    windows_ml = rows[WINDOWS_ML_ROW]
    assert windows_ml["available"] is False
    # The real projection was imported and failed as on a PC without the Windows App SDK runtime.
    assert "Windows ML catalog is not usable" in windows_ml["reason"] and "winui3" in windows_ml["reason"]
    assert {"torch:cpu", "openvino:CPU"} <= set(rows)


def test_installed_app_renders_the_chat_window(prefix, tmp_path):
    from PySide6.QtGui import QImage

    png = tmp_path / "out.png"
    prefix.run(prefix.app / "specd-desktop.exe", "--screenshot", winpath(png))
    image = QImage(str(png))
    assert not image.isNull() and image.width() >= 600 and image.height() >= 400
    colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert len(colours) > 20, "the screenshot is blank"


@pytest.mark.smollm2
def test_installed_specd_chat_is_token_identical_to_the_linux_client(prefix, smollm2_folder, tmp_path):
    linux_cache = Path(os.environ.get("SPECD_CACHE_DIR", Path.home() / ".cache" / "specd"))
    daemon = DaemonProcess(smollm2_folder, tmp_path)
    port = daemon.start(timeout=180)
    try:
        common = ["chat", "--host", "127.0.0.1", "--port", str(port), "--prompt", PROMPT, "--temperature", "0",
                  "--max-new-tokens", "24", "--json", "--device", "onnxruntime-genai:cpu"]
        # One explicit precision on both sides, so the Windows client opens the very draft copied to it.
        linux_config = tmp_path / "linux.toml"
        linux_config.write_text('[models]\ndraft_precision = "int4"\n')
        linux = subprocess.run([sys.executable, "-m", "specd.desktop.cli", *common, "--config", str(linux_config)],
                               capture_output=True, text=True, timeout=600,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "SPECD_CACHE_DIR": str(linux_cache)})
        assert linux.returncode == 0, linux.stderr[-3000:]
        # Building the draft inside the Windows bundle under Wine is slow; ONNX Runtime GenAI folders are
        # platform-neutral, so the Windows client gets the one the Linux client prepared (and its tokenizer).
        cache = tmp_path / "windows-cache"
        for part in ("models/smollm2-135m-instruct", "drafts/ortgenai-smollm2-135m-instruct-int4-cpu"):
            shutil.copytree(linux_cache / part, cache / part)
        config = tmp_path / "windows.toml"
        config.write_text(f"[models]\ncache_dir = {json.dumps(winpath(cache))}\ndraft_precision = \"int4\"\n")
        windows = json_in(prefix.run(prefix.app / "specd.exe", *common, "--config", winpath(config)))
    finally:
        daemon.stop()
    expected = json.loads(linux.stdout.strip().splitlines()[-1])
    assert windows["token_ids"] == expected["token_ids"] and len(expected["token_ids"]) > 0
    assert windows["prompt_token_ids"] == expected["prompt_token_ids"]


def test_silent_uninstall_removes_the_files(prefix):
    prefix.run(prefix.app / "unins000.exe", "/VERYSILENT", "/SUPPRESSMSGBOXES", display=True)
    assert not prefix.app.exists() or not any(prefix.app.iterdir()), sorted(p.name for p in prefix.app.iterdir())


# -- the fake Windows ML projection of the unit tests against the real package ------------------------
def stub_names(installer) -> dict[str, set[str]]:
    """Class -> member names of the real Windows ML projection, from the package the bundle was built with."""
    package = windows_cache() / "python" / "Lib" / "site-packages" / "winui3"
    names: dict[str, set[str]] = {"module": set()}
    stub = package / "_winui3_microsoft_windows_ai_machinelearning.pyi"
    init = package / "microsoft" / "windows" / "ai" / "machinelearning" / "__init__.py"
    for tree in (ast.parse(stub.read_text()), ast.parse(init.read_text())):
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                members = {n.name for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
                members |= {t.id for n in node.body if isinstance(n, ast.Assign) for t in n.targets
                            if isinstance(t, ast.Name)}
                names.setdefault(node.name.removesuffix("_Static"), set()).update(members)
                names["module"].add(node.name)
    return names


def test_the_fake_windows_ml_projection_uses_the_real_api_names(installer):
    real = stub_names(installer)
    for owner, used in winml.PROJECTION_API.items():
        assert set(used) <= real.get(owner, set()), f"{owner}: {set(used) - real.get(owner, set())} not in the real API"
        fake_owner = fake_windows_ml if owner == "module" else getattr(fake_windows_ml, owner)
        fake = set(dir(fake_owner)) | set(getattr(fake_owner, "__dataclass_fields__", {}))
        assert set(used) <= fake, f"the fake {owner} lacks {set(used) - fake}"
