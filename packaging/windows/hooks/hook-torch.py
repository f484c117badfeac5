# torch in the desktop bundle. It replaces pyinstaller-hooks-contrib's hook-torch (hooks of the spec's
# hookspath take priority) with the same collection, except the module list: the contrib hook runs
# collect_submodules("torch"), one child interpreter importing all of torch's ~340 subpackages (a quarter
# of an hour under Wine); pyinstaller_shared.submodules lists them from torch's folders instead.
# Left out: the CUDA libraries (the desktop bundle is built from the CPU wheel) and the MKL DLLs of
# Anaconda builds (PyPI's Windows wheel does not depend on MKL).
import pyinstaller_shared as shared  # the spec put packaging/ on sys.path
from PyInstaller.utils.hooks import PY_DYLIB_PATTERNS, collect_data_files, collect_dynamic_libs

# TorchScript and torch.jit read the sources of some modules at run time, as the contrib hook says.
module_collection_mode = "pyz+py"
warn_on_missing_hiddenimports = False

datas = collect_data_files("torch", excludes=["**/*.h", "**/*.hpp", "**/*.cuh", "**/*.lib", "**/*.cpp", "**/*.pyi",
                                              "**/*.cmake"])
hiddenimports = shared.submodules("torch", keep=shared.wanted_torch_module)
binaries = collect_dynamic_libs("torch", search_patterns=[*PY_DYLIB_PATTERNS, "*.so.*"])
