"""How a bundled executable starts: the entry point, or ``-m module`` like a Python interpreter.

specd starts some helpers as ``sys.executable -m module`` (the ONNX Runtime GenAI model builder). In a
PyInstaller bundle ``sys.executable`` is the app itself, so the app understands that form too.
"""

from __future__ import annotations

import multiprocessing
import runpy
import sys
from collections.abc import Callable


def run(main: Callable[[], int | None]) -> None:
    multiprocessing.freeze_support()
    args = sys.argv[1:]
    if args[:1] == ["-u"]:  # unbuffered, as `python -u`: the parent reads progress line by line
        args = args[1:]
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.reconfigure(write_through=True)
    if args[:1] == ["-m"] and len(args) >= 2:
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        sys.exit(0)
    sys.exit(main())
