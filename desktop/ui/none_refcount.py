"""A guard against PySide6 6.12's lost reference to ``None`` on Python 3.11.

PySide6 6.12.0 (shiboken6 6.12.0) returns ``None`` from every void method without taking a reference,
so each call such as ``QLabel.setText`` or ``QTextCursor.insertHtml`` drops ``None``'s count by one.
``None`` starts with a few thousand references, so after some thousands of Qt calls — a few minutes of
streaming — CPython aborts with "Fatal Python error: none_dealloc". Python 3.12 made ``None``
immortal (PEP 683), which hides the bug there. On older Pythons we raise the count once by 2**40, far
more than any session's Qt calls can take away. No Qt import here: it must run before Qt is used.
"""

from __future__ import annotations

import ctypes
import sys

HEADROOM = 1 << 40
_done = False


def protect_none() -> bool:
    """Give ``None`` its headroom once per process (Python < 3.12 only); True if it was given now."""
    global _done
    if _done or sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return False
    ctypes.c_ssize_t.from_address(id(None)).value += HEADROOM  # ob_refcnt is the object's first field
    _done = True
    return True
