"""Packaging checks that run everywhere in seconds: the systemd unit (verified and rated by systemd-analyze,
from Debian's systemd package where it is missing), install.sh / uninstall.sh against a temporary root, the
PyInstaller specs, the Inno Setup script, the Windows build script and workflow, and the app icon. The bundle
itself is built and started (plainly and inside the unit's sandbox) by tests/test_packaging_smoke.py."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from specd.daemon.client_keys import key_digest, read_keys_file
from tests.debian_tools import debian_tool
from tests.systemd_unit import unit_entries, values

ROOT = Path(__file__).resolve().parents[1]
LINUX = ROOT / "packaging" / "linux"
WINDOWS = ROOT / "packaging" / "windows"
UNIT = LINUX / "specd-verifier.service"
SYSTEM_UNITS = Path("/lib/systemd/system")

sys.path.insert(0, str(ROOT / "packaging"))
import pyinstaller_shared  # noqa: E402

# --- the unit -------------------------------------------------------------------------------------------------


def test_the_unit_is_a_hardened_notify_service_that_keeps_the_gpus():
    service = unit_entries(UNIT.read_text())["Service"]
    one = {k: v for k, v in service}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"].startswith("/opt/specd/specd-verifier/specd-verifier ")
    assert "--config /etc/specd/config.toml" in one["ExecStart"]
    # The keys file is root's: root copies it for the dynamic user at start and reload, then signals the daemon.
    assert one["ExecStart"].endswith(" --keys-file /var/lib/specd/keys.toml")
    assert one["ExecStartPre"] == "+/opt/specd/copy-keys.sh /etc/specd/keys.toml /var/lib/specd/keys.toml"
    assert one["ExecReload"] == "+/opt/specd/copy-keys.sh /etc/specd/keys.toml /var/lib/specd/keys.toml $MAINPID"
    for key in ("WatchdogSec", "TimeoutStartSec"):
        assert key in one
    assert one["Restart"] == "on-failure"
    assert one["DynamicUser"] == "yes"
    assert one["StateDirectory"] == "specd" and one["CacheDirectory"] == "specd"
    assert "HF_HOME=%C/specd/huggingface" in values(service, "Environment")
    assert one["EnvironmentFile"] == "-/etc/specd/verifier.env"
    assert one["ProtectSystem"] == "strict"
    for key in ("ProtectHome", "PrivateTmp", "NoNewPrivileges", "PrivateUsers", "ProtectClock"):
        assert one[key] == "yes", key
    assert one["CapabilityBoundingSet"] == ""
    assert one["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    # The GPUs stay reachable: NVIDIA's device groups, ROCm's render nodes and compute queues, group render.
    assert one["DevicePolicy"] == "closed"
    allowed = {value.split()[0] for value in values(service, "DeviceAllow")}
    assert {"char-nvidiactl", "char-nvidia-uvm", "char-nvidia-caps", "char-drm", "char-kfd"} <= allowed
    assert "render" in one["SupplementaryGroups"].split()
    # Each of these hides /dev/nvidia*, /proc/meminfo or /proc/driver/nvidia, or breaks JIT-compiled kernels.
    for key in ("MemoryDenyWriteExecute", "PrivateDevices", "ProcSubset"):
        assert key not in one, key
    assert values(service, "SystemCallFilter") == ["@system-service", "~@privileged"]
    assert unit_entries(UNIT.read_text())["Install"] == [("WantedBy", "multi-user.target")]


# --- install.sh / uninstall.sh against a temporary root ------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path):
    """A staging root, a fake bundle, and a fake systemctl that records its calls."""
    bundle = tmp_path / "bundle" / "specd-verifier"
    bundle.mkdir(parents=True)
    program = bundle / "specd-verifier"
    program.write_text("#!/bin/sh\necho v1\n")
    program.chmod(0o755)
    (bundle / "_internal").mkdir()
    (bundle / "_internal" / "old-only.so").write_text("x")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl-calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n')
    fake.chmod(0o755)
    root = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(root), "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def run(script: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(LINUX / script), *args], env={**env, **extra_env},
                              capture_output=True, text=True, timeout=60)

    def systemctl_calls() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    return SimpleNamespace(root=root, bundle=bundle, run=run, calls=systemctl_calls, tmp=tmp_path)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_puts_everything_in_place_and_is_idempotent(sandbox):
    first = sandbox.run("install.sh", "--bundle", str(sandbox.bundle))
    assert first.returncode == 0, first.stderr
    root = sandbox.root
    program = root / "opt/specd/specd-verifier/specd-verifier"
    assert program.read_text() == "#!/bin/sh\necho v1\n" and os.access(program, os.X_OK)
    unit = root / "etc/systemd/system/specd-verifier.service"
    assert unit.read_text() == UNIT.read_text() and mode(unit) == 0o644
    config = root / "etc/specd/config.toml"
    assert config.read_text() == (ROOT / "config.toml").read_text() and mode(config) == 0o644
    keys_file = root / "etc/specd/keys.toml"
    assert mode(keys_file) == 0o600 and not (root / "etc/specd/verifier.env").exists()
    key = re.search(r"^    (specd-[0-9a-f]{64})$", first.stdout, re.M).group(1)  # printed once
    (record,) = read_keys_file(keys_file).values()  # the format the verifier reads
    assert record.name == "laptop-1" and record.digest == key_digest(key) and key not in keys_file.read_text()
    assert "keys add NAME --config /etc/specd/config.toml" in first.stdout
    assert os.readlink(root / "etc/specd/keys-usage.json") == "/var/lib/specd/keys-usage.json"
    assert (root / "opt/specd/README.md").is_file() and os.access(root / "opt/specd/copy-keys.sh", os.X_OK)
    assert sandbox.calls() == ["daemon-reload"]

    # Upgrade: a new bundle replaces the old one whole; settings and the key stay; a running service restarts.
    config.write_text("# edited by the admin\n")
    keys_file.chmod(0o644)
    keys = keys_file.read_text()
    (sandbox.bundle / "specd-verifier").write_text("#!/bin/sh\necho v2\n")
    (sandbox.bundle / "_internal" / "old-only.so").unlink()
    second = sandbox.run("install.sh", "--bundle", str(sandbox.bundle))
    assert second.returncode == 0, second.stderr
    assert program.read_text() == "#!/bin/sh\necho v2\n"
    assert not (root / "opt/specd/specd-verifier/_internal/old-only.so").exists()
    assert config.read_text() == "# edited by the admin\n"
    assert keys_file.read_text() == keys and mode(keys_file) == 0o600
    assert not re.search(r"specd-[0-9a-f]{64}", second.stdout)  # no new key on an upgrade
    assert sorted(p.name for p in (root / "opt/specd").iterdir()) == ["README.md", "copy-keys.sh", "specd-verifier"]
    assert sandbox.calls() == ["daemon-reload", "daemon-reload", "try-restart specd-verifier.service"]


def test_install_rewrites_paths_for_another_prefix(sandbox):
    result = sandbox.run("install.sh", "--bundle", str(sandbox.bundle), PREFIX="/srv/specd", SYSCONFDIR="/srv/etc")
    assert result.returncode == 0, result.stderr
    service = dict(unit_entries((sandbox.root / "etc/systemd/system/specd-verifier.service").read_text())["Service"])
    assert service["ExecStart"] == ("/srv/specd/specd-verifier/specd-verifier --config /srv/etc/config.toml "
                                    "--keys-file /var/lib/specd/keys.toml")
    assert service["ExecReload"] == "+/srv/specd/copy-keys.sh /srv/etc/keys.toml /var/lib/specd/keys.toml $MAINPID"
    assert service["EnvironmentFile"] == "-/srv/etc/verifier.env"
    assert (sandbox.root / "srv/etc/keys.toml").is_file()


def test_install_says_what_to_do_without_a_bundle(sandbox):
    result = sandbox.run("install.sh", "--bundle", str(sandbox.tmp / "missing"))
    assert result.returncode != 0
    assert "make package-daemon" in result.stderr
    assert not (sandbox.root / "etc").exists()


def test_install_for_a_venv_uses_a_drop_in_and_switching_back_removes_it(sandbox):
    venv_program = sandbox.root / "opt/venvs/specd/bin/specd-verifier"
    venv_program.parent.mkdir(parents=True)
    venv_program.write_text("#!/bin/sh\n")
    venv_program.chmod(0o755)
    result = sandbox.run("install.sh", "--venv", "/opt/venvs/specd/")
    assert result.returncode == 0, result.stderr
    dropin = sandbox.root / "etc/systemd/system/specd-verifier.service.d/venv.conf"
    service = unit_entries(dropin.read_text())["Service"]
    assert values(service, "ExecStart") == ["", "/opt/venvs/specd/bin/specd-verifier --config /etc/specd/config.toml "
                                            "--keys-file /var/lib/specd/keys.toml"]
    assert not (sandbox.root / "opt/specd/specd-verifier").exists()

    back = sandbox.run("install.sh", "--bundle", str(sandbox.bundle))
    assert back.returncode == 0, back.stderr
    assert not dropin.parent.exists()


def test_install_refuses_a_venv_the_service_cannot_see(sandbox):
    venv_program = sandbox.root / "home/alice/venv/bin/specd-verifier"
    venv_program.parent.mkdir(parents=True)
    venv_program.write_text("#!/bin/sh\n")
    venv_program.chmod(0o755)
    result = sandbox.run("install.sh", "--venv", "/home/alice/venv")
    assert result.returncode != 0
    assert "ProtectHome=yes" in result.stderr and "/opt/specd/venv" in result.stderr
    assert not (sandbox.root / "etc").exists()


def test_an_existing_shared_key_is_kept_and_no_named_key_is_made(sandbox):
    envfile = sandbox.root / "etc/specd/verifier.env"
    envfile.parent.mkdir(parents=True)
    envfile.write_text("SPECD_API_KEY=old-shared-key\n")
    result = sandbox.run("install.sh", "--bundle", str(sandbox.bundle))
    assert result.returncode == 0, result.stderr
    assert not (sandbox.root / "etc/specd/keys.toml").exists() and mode(envfile) == 0o600
    assert "keys add NAME" in result.stdout
    assert sandbox.run("install.sh", "--bundle", str(sandbox.bundle), "--key-name", "default").returncode != 0


def test_copy_keys_gives_the_service_a_private_copy_and_signals_it(tmp_path):
    source, state = tmp_path / "keys.toml", tmp_path / "state"
    state.mkdir()
    source.write_text("[keys.a]\n")
    source.chmod(0o600)
    copy = state / "keys.toml"
    script = LINUX / "copy-keys.sh"
    subprocess.run([str(script), str(source), str(copy)], check=True, timeout=30)
    assert copy.read_text() == "[keys.a]\n" and mode(copy) == 0o600
    assert (copy.stat().st_uid, copy.stat().st_gid) == (state.stat().st_uid, state.stat().st_gid)
    marker, ready = tmp_path / "hup", tmp_path / "ready"
    # A Python waiter, not `sh -c 'trap …'`: a shell cannot trap a signal it was started with ignored (a
    # test run under nohup), and the file it writes once the handler is set keeps the HUP from coming first.
    waiter = subprocess.Popen([sys.executable, "-c", (
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGHUP, lambda *_: (pathlib.Path({str(marker)!r}).write_text('hup\\n'), sys.exit(0)))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "while True:\n    time.sleep(0.05)\n")])
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        source.write_text("[keys.b]\n")
        subprocess.run([str(script), str(source), str(copy), str(waiter.pid)], check=True, timeout=30)
        assert waiter.wait(10) == 0 and marker.read_text() == "hup\n"
    finally:
        waiter.kill()
    assert copy.read_text() == "[keys.b]\n"
    source.unlink()  # the keys file removed: so is the copy (the verifier then keeps the keys it has)
    subprocess.run([str(script), str(source), str(copy)], check=True, timeout=30)
    assert not copy.exists()


def test_uninstall_keeps_settings_unless_purged(sandbox):
    assert sandbox.run("install.sh", "--bundle", str(sandbox.bundle)).returncode == 0
    cache = sandbox.root / "var/cache/private/specd/models"
    cache.mkdir(parents=True)
    result = sandbox.run("uninstall.sh")
    assert result.returncode == 0, result.stderr
    assert not (sandbox.root / "opt/specd").exists()
    assert not (sandbox.root / "etc/systemd/system/specd-verifier.service").exists()
    assert (sandbox.root / "etc/specd/keys.toml").is_file() and cache.is_dir()
    assert sandbox.calls()[-2:] == ["disable --now specd-verifier.service", "daemon-reload"]

    assert sandbox.run("uninstall.sh", "--purge").returncode == 0
    assert not (sandbox.root / "etc/specd").exists() and not cache.exists()
    assert sandbox.run("uninstall.sh", "--purge").returncode == 0  # nothing left to remove: still fine


# --- systemd-analyze on the installed unit (bundle and venv variants) -------------------------------------------


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    """systemd-analyze, from Debian's systemd package where it is missing: it only reads unit files here, so no
    running systemd is needed."""
    found = debian_tool("systemd-analyze", "systemd")
    if found is None or not SYSTEM_UNITS.is_dir():
        pytest.skip("systemd-analyze is missing and Debian's systemd package could not be installed here "
                    "(that needs root, apt-get and a reachable Debian mirror)")
    return found


def install_variant(sandbox, variant: str) -> None:
    """install.sh into the staging root as a bundle or as a venv (whose drop-in replaces ExecStart), with the
    system's units beside it so that systemd-analyze resolves dependencies such as sysinit.target."""
    if variant == "venv":
        program = sandbox.root / "opt/specd/venv/bin/specd-verifier"
        program.parent.mkdir(parents=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
        args = ["--venv", "/opt/specd/venv"]
    else:
        args = ["--bundle", str(sandbox.bundle)]
    assert sandbox.run("install.sh", *args).returncode == 0
    shutil.copytree(SYSTEM_UNITS, sandbox.root / "usr/lib/systemd/system", symlinks=True)


@pytest.mark.parametrize("variant", ["bundle", "venv"])
def test_systemd_analyze_verifies_the_installed_unit(sandbox, systemd_analyze, variant):
    install_variant(sandbox, variant)
    result = subprocess.run([systemd_analyze, "verify", f"--root={sandbox.root}",
                             "/etc/systemd/system/specd-verifier.service"],
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 on ignored (mistyped) settings too: any message about the unit is a failure.
    messages = [line for line in (result.stdout + result.stderr).splitlines() if "specd-verifier" in line]
    assert result.returncode == 0 and not messages, result.stdout + result.stderr


@pytest.mark.parametrize("variant", ["bundle", "venv"])
def test_the_installed_unit_rates_an_exposure_of_at_most_2(sandbox, systemd_analyze, variant):
    install_variant(sandbox, variant)
    result = subprocess.run([systemd_analyze, "security", "--offline=yes", f"--root={sandbox.root}", "--no-pager",
                             "specd-verifier.service"], capture_output=True, text=True, timeout=60)
    rating = re.search(r"Overall exposure level for specd-verifier\.service: (\d+\.\d+)", result.stdout)
    assert result.returncode == 0 and rating, result.stdout + result.stderr
    assert float(rating.group(1)) <= 2.0, result.stdout


# --- PyInstaller specs and the frozen entry point ------------------------------------------------------------


class _Recorder:
    """Stands in for PyInstaller's spec classes and records how the spec calls them."""

    def __init__(self, log: list, kind: str):
        self.log, self.kind = log, kind

    def __call__(self, *args, **kwargs):
        obj = SimpleNamespace(kind=self.kind, args=args, kwargs=kwargs, binaries=[], datas=[], pure=[])
        if self.kind == "Analysis":
            obj.scripts = [(Path(s).stem, s, "PYSOURCE") for s in args[0]] + [("pyiboot01_bootstrap", "", "PYSOURCE")]
        self.log.append(obj)
        return obj


def run_spec(spec: Path, tmp_path: Path, monkeypatch, platform: str) -> dict[str, list]:
    """Execute a .spec with recording stand-ins for PyInstaller's classes and slow hook helpers."""
    import PyInstaller.utils.hooks as hooks

    monkeypatch.setattr(hooks, "collect_submodules", lambda package, filter=None: [f"{package}.stub"])
    monkeypatch.setattr(hooks, "collect_all", lambda package: ([], [], [package]))
    monkeypatch.setattr(hooks, "collect_dynamic_libs", lambda package, **kw: [(f"/lib/{package}.so", package)])
    monkeypatch.setattr(sys, "platform", platform)
    log: list = []
    namespace = {name: _Recorder(log, name) for name in ("Analysis", "PYZ", "EXE", "COLLECT")}
    namespace.update(SPEC=str(spec), SPECPATH=str(spec.parent), workpath=str(tmp_path / "work"),
                     DISTPATH=str(tmp_path / "dist"))
    runpy.run_path(str(spec), init_globals=namespace)
    by_kind: dict[str, list] = {}
    for obj in log:
        by_kind.setdefault(obj.kind, []).append(obj)
    return by_kind


def test_the_verifier_spec_is_onedir_and_leaves_the_desktop_out(tmp_path, monkeypatch):
    built = run_spec(LINUX / "specd-verifier.spec", tmp_path, monkeypatch, "linux")
    (analysis,) = built["Analysis"]
    scripts = [Path(s) for s in analysis.args[0]]
    assert all(s.is_file() for s in scripts) and "specd.daemon.cli" in scripts[0].read_text()
    for name in ("specd.desktop", "PySide6", "onnxruntime_genai", "openvino", "torchvision", "optimum"):
        assert name in analysis.kwargs["excludes"], name
    assert "torch" not in analysis.kwargs["excludes"] and "transformers" not in analysis.kwargs["excludes"]
    staged = Path(analysis.kwargs["pathex"][0])
    assert (staged / "specd" / "daemon" / "cli.py").is_file() and (staged / "specd" / "shared").is_dir()
    (exe,) = built["EXE"]
    assert exe.kwargs["name"] == "specd-verifier" and exe.kwargs["exclude_binaries"] is True
    assert len(built["COLLECT"]) == 1, "onedir: a COLLECT folder, never onefile"


@pytest.mark.parametrize("platform", ["win32", "linux"])
def test_the_desktop_spec_builds_two_programs_with_the_edge_backends(tmp_path, monkeypatch, platform):
    built = run_spec(WINDOWS / "specd-desktop.spec", tmp_path, monkeypatch, platform)
    (analysis,) = built["Analysis"]
    excludes = analysis.kwargs["excludes"]
    for name in ("specd.daemon", "systemd", "triton", "torchvision", "optimum"):
        assert name in excludes, name
    for name in ("torch", "onnxruntime_genai", "openvino", "PySide6"):
        assert name not in excludes, name
    hidden = analysis.kwargs["hiddenimports"]
    assert "openvino.opset13" in hidden and "openvino.frontend.pytorch.ts_decoder" in hidden
    assert not any("torchdynamo" in name for name in hidden), "OpenVINO's torch.compile backend is never used"
    assert "onnxruntime_genai" in hidden and "specd.desktop.ui.app" in hidden
    assert (Path(analysis.kwargs["hookspath"][0]) / "hook-torch.py").is_file()
    exes = {e.kwargs["name"]: e for e in built["EXE"]}
    assert exes["specd-desktop"].kwargs["console"] is False and exes["specd"].kwargs["console"] is True
    # each program runs its own entry script only
    assert [s[0] for s in exes["specd-desktop"].args[1]] == ["specd_desktop", "pyiboot01_bootstrap"]
    assert [s[0] for s in exes["specd"].args[1]] == ["specd_cli", "pyiboot01_bootstrap"]
    if platform == "win32":
        for exe in exes.values():
            assert Path(exe.kwargs["icon"]).is_file()
            assert Path(exe.kwargs["version"]).is_file()
    else:
        assert all(e.kwargs["version"] is None for e in exes.values())


def test_submodules_walks_the_folders_without_importing(tmp_path):
    package = tmp_path / "pkg"
    for folder in ("sub", "skipped", "data"):
        (package / folder).mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('listing must not import pkg')\n")
    for name in ("a.py", "sub/__init__.py", "sub/b.py", "skipped/__init__.py", "skipped/c.py", "data/notes.txt",
                 "_ext.cp311-win_amd64.pyd", "not-a-module.py"):
        (package / name).write_text("")
    listed = pyinstaller_shared.submodules("pkg", keep=lambda name: "skipped" not in name, root=tmp_path)
    assert listed == ["pkg", "pkg._ext", "pkg.a", "pkg.sub", "pkg.sub.b"]
    namespace = tmp_path / "ns" / "inner"  # no __init__.py anywhere, like the Windows ML projection's winui3
    namespace.mkdir(parents=True)
    (namespace / "m.py").write_text("")
    assert pyinstaller_shared.submodules("ns", root=tmp_path) == ["ns", "ns.inner", "ns.inner.m"]
    assert pyinstaller_shared.submodules("no_such_package_here") == []


def test_submodules_finds_what_pyinstallers_collect_submodules_finds():
    from PyInstaller.utils.hooks import collect_submodules

    assert pyinstaller_shared.submodules("onnx_ir") == collect_submodules("onnx_ir")


def test_what_the_desktop_bundle_excludes_is_never_imported(tmp_path):
    """The app's modules, transformers' model loading, both converters and a tokenizer, in a fresh interpreter:
    none of them imports what the Windows bundle leaves out (the full measurement also ran every drafter and
    conversion; this keeps the list honest as the code changes)."""
    from tests.tiny_models import save_tiny_model

    save_tiny_model(tmp_path / "tiny", seed=1)
    script = f"""
import importlib, json, pkgutil, sys
import specd.desktop
for info in pkgutil.walk_packages(specd.desktop.__path__, "specd.desktop."):
    importlib.import_module(info.name)
import transformers.modeling_utils, transformers.modeling_gguf_pytorch_utils
import openvino.frontend.pytorch.ts_decoder, onnxruntime_genai.models.builder
from specd.shared.models import load_tokenizer_from
load_tokenizer_from(__import__("pathlib").Path({str(tmp_path / "tiny")!r}))
print(json.dumps(sorted(sys.modules)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    excluded = pyinstaller_shared.DESKTOP_UNUSED + pyinstaller_shared.transformers_unused()
    assert len(imported) > 1000 and len(excluded) > 100
    clashes = [m for m in imported if any(m == x or m.startswith(x + ".") for x in excluded)]
    assert not clashes, f"the Windows bundle excludes modules the app imports: {clashes[:20]}"


def test_the_windows_version_resource_comes_from_the_package(tmp_path):
    version = pyinstaller_shared.package_version()
    path = pyinstaller_shared.windows_version_file(tmp_path, "specd-desktop", "specd")
    record = lambda *args, **kwargs: (args, kwargs)
    names = ("VSVersionInfo", "FixedFileInfo", "StringFileInfo", "StringTable", "StringStruct", "VarFileInfo",
             "VarStruct")
    info = eval(Path(path).read_text(), {name: record for name in names})  # PyInstaller evaluates it the same way
    fixed = info[1]["ffi"][1]
    assert fixed["filevers"] == fixed["prodvers"] == pyinstaller_shared.numeric_version(version)
    strings = dict(s[0] for s in info[1]["kids"][0][0][0][0][0][1])
    assert strings["ProductVersion"] == strings["FileVersion"] == version
    assert strings["OriginalFilename"] == "specd-desktop.exe"


@pytest.mark.parametrize(("version", "numbers"), [("0.1.0", (0, 1, 0, 0)), ("1.2.3.dev4+g12ab", (1, 2, 3, 0)),
                                                  ("2.0rc1", (2, 0, 0, 0)), ("3", (3, 0, 0, 0))])
def test_numeric_version(version, numbers):
    assert pyinstaller_shared.numeric_version(version) == numbers


def test_the_bundled_model_families_exist_and_the_filter_keeps_only_them():
    import importlib.util

    for family in pyinstaller_shared.ARCHITECTURES:
        assert importlib.util.find_spec(f"transformers.models.{family}") is not None, family
    wanted = pyinstaller_shared.wanted_transformers_module
    assert wanted("transformers.models.llama.modeling_llama")
    assert wanted("transformers.models.auto.modeling_auto") and wanted("transformers.generation.utils")
    assert not wanted("transformers.models.bert.modeling_bert")
    assert not wanted("transformers.models.llama.modular_llama")
    assert not wanted("transformers.trainer_utils") and not wanted("transformers.pipelines.base")


def test_the_frozen_entry_point_also_runs_modules_like_python(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'packaging')!r}); "
            "import frozen_main; frozen_main.run(lambda: 3)")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 3
    module = tmp_path / "hello_module.py"
    module.write_text("import sys\nprint('hello', sys.argv[1:])\n")
    as_module = subprocess.run([sys.executable, "-c", code, "-u", "-m", "hello_module", "--flag"],
                               capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert as_module.returncode == 0, as_module.stderr
    assert as_module.stdout == "hello ['--flag']\n"


# --- the Windows installer, build script and workflow --------------------------------------------------------


def iss_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(";") or (stripped.startswith("#") and current != "Code"):
            continue
        if re.fullmatch(r"\[\w+\]", stripped):
            current = stripped[1:-1]
            sections.setdefault(current, [])
        elif current is not None:
            sections[current].append(stripped)
    return sections


def iss_entry(line: str) -> dict[str, str]:
    """``Name: "x"; Flags: a b`` -> {"Name": "x", "Flags": "a b"} (quotes doubled inside values)."""
    entry = {}
    for match in re.finditer(r'(\w+):\s*("(?:[^"]|"")*"|[^;]*)\s*(?:;|$)', line):
        value = match.group(2).strip()
        entry[match.group(1)] = value[1:-1].replace('""', '"') if value.startswith('"') else value
    return entry


ISS = (WINDOWS / "specd.iss").read_text()


def test_the_installer_is_per_user_and_takes_its_version_from_the_build():
    sections = iss_sections(ISS)
    assert set(sections) >= {"Setup", "Files", "Icons", "Tasks", "Registry", "Run", "UninstallRun", "Code"}
    setup = dict(line.split("=", 1) for line in sections["Setup"])
    assert setup["PrivilegesRequired"] == "lowest"
    assert setup["DefaultDirName"].startswith("{localappdata}\\Programs\\")
    assert setup["CloseApplications"] in ("yes", "force") and setup["RestartApplications"] == "no"
    assert setup["AppVersion"] == "{#AppVersion}" and "{#AppVersion}" in setup["OutputBaseFilename"]
    assert setup["VersionInfoVersion"] == "{#AppVersionNumeric}"
    assert re.fullmatch(r"\{\{[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}\}", setup["AppId"])
    assert setup["SetupIconFile"] == "{#Root}\\desktop\\ui\\specd.ico" and (ROOT / "desktop/ui/specd.ico").is_file()
    # No build without a version: the preprocessor stops with a message.
    assert re.search(r"#ifndef AppVersion\s+#error .*build\.ps1", ISS)
    openings = re.findall(r"^\s*#(?:if|ifdef|ifndef)\b", ISS, re.M)
    assert len(openings) == len(re.findall(r"^\s*#endif\b", ISS, re.M))


def test_the_installer_entries_shortcut_autostart_and_cleanup():
    sections = iss_sections(ISS)
    files = [iss_entry(line) for line in sections["Files"]]
    assert files[0]["Source"] == "{#BundleDir}\\*" and "recursesubdirs" in files[0]["Flags"]
    icons = [iss_entry(line) for line in sections["Icons"]]
    assert any(i["Name"].startswith("{autoprograms}\\") and "Tasks" not in i for i in icons), "Start Menu shortcut"
    tasks = {t["Name"]: t for t in map(iss_entry, sections["Tasks"])}
    assert "unchecked" in tasks["startup"]["Flags"]
    (run_key,) = [iss_entry(line) for line in sections["Registry"]]
    assert run_key["Root"] == "HKCU" and run_key["Subkey"].endswith("CurrentVersion\\Run")
    assert run_key["Tasks"] == "startup" and "uninsdeletevalue" in run_key["Flags"]
    assert run_key["ValueData"] == '"{app}\\{#AppExe}"'
    code = "\n".join(sections["Code"])
    assert "procedure CurUninstallStepChanged" in code and "usPostUninstall" in code
    assert "UninstallSilent()" in code and "MsgBox(" in code and "MB_DEFBUTTON2" in code
    assert "DelTree(DataDir" in code and "ExpandConstant('{localappdata}\\{#AppName}')" in code
    assert len(re.findall(r"\bbegin\b", code)) == len(re.findall(r"\bend\b", code))


def test_build_ps1_passes_every_define_the_installer_needs():
    script = (WINDOWS / "build.ps1").read_text()
    defines = set(re.findall(r'"/D(\w+)=', script))
    assert {"AppVersion", "AppVersionNumeric", "BundleDir", "OutputDir"} <= defines
    for name in defines:
        assert re.search(rf"#ifn?def {name}\b", ISS), f"build.ps1 defines {name}, specd.iss never reads it"
    assert "importlib.metadata" in script and "m.version('specd')" in script
    assert "packaging\\windows\\specd-desktop.spec" in script and "packaging\\windows\\specd.iss" in script
    assert "download.pytorch.org/whl/cpu" in script  # the CPU torch: no CUDA in the desktop bundle
    # cheap structural check, since PowerShell cannot run here
    for opening, closing in ("{}", "()"):
        assert script.count(opening) == script.count(closing), opening + closing


def test_the_windows_workflow_builds_installs_and_uploads():
    import yaml

    workflow = yaml.safe_load((ROOT / ".github/workflows/windows-desktop.yml").read_text())
    assert workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    (job,) = workflow["jobs"].values()
    assert job["runs-on"].startswith("windows")
    runs = "\n".join(step.get("run", "") for step in job["steps"])
    assert "packaging/windows/build.ps1" in runs and "unins000.exe" in runs
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"] == "dist/specd-desktop-*-setup.exe"


# --- the app icon --------------------------------------------------------------------------------------------


def ico_images(data: bytes) -> dict[int, bytes]:
    reserved, kind, count = struct.unpack_from("<HHH", data)
    assert (reserved, kind) == (0, 1)
    images = {}
    for i in range(count):
        width, height, _, _, planes, bits, size, offset = struct.unpack_from("<BBBBHHII", data, 6 + 16 * i)
        assert width == height and planes == 1 and bits == 32
        images[width or 256] = data[offset:offset + size]
    return images


def test_the_icon_files_are_valid_and_rendered_from_the_svg(qapp):
    # pytest-qt's QApplication: a bare QGuiApplication made here would outlive the test, and every later
    # QWidget in this process would abort.
    ui = ROOT / "desktop" / "ui"
    images = ico_images((ui / "specd.ico").read_bytes())
    assert {16, 24, 32, 48, 256} <= set(images)
    for size, png in images.items():
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", png[16:24]) == (size, size)
    assert (ui / "icon.png").read_bytes() == images[256]

    import make_icon
    from PySide6.QtGui import QImage

    for size in (32, 256):
        fresh = QImage.fromData(make_icon.render_png(ui / "icon.svg", size))
        committed = QImage.fromData(images[size])
        worst = max(abs(a - b) for y in range(0, size, 3) for x in range(0, size, 3)
                    for a, b in zip(fresh.pixelColor(x, y).getRgb(), committed.pixelColor(x, y).getRgb(), strict=True))
        assert worst <= 8, "the icon files are out of date: run packaging/make_icon.py"


# --- the README ----------------------------------------------------------------------------------------------


def test_the_readme_says_how_to_install_both_sides():
    readme = (ROOT / "README.md").read_text()
    for heading in ("## Install the verifier on a Linux server", "## Install the desktop app on Windows"):
        assert heading in readme
    for fact in ("make package-daemon", "install.sh", "/etc/specd/keys.toml", "journalctl -u specd-verifier",
                 "build.ps1", "%LOCALAPPDATA%"):
        assert fact in readme, fact
