"""Entry point of ``specd-desktop.exe``, the tray app (see specd-desktop.spec)."""

from frozen_main import run

from specd.desktop.ui.app import main

run(main)
