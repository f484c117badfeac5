"""The PySide6 tray app; the only place specd imports Qt."""

from specd.desktop.ui.none_refcount import protect_none

protect_none()  # before any Qt call: see none_refcount (PySide6 6.12 on Python 3.11)
