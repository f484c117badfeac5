"""Entry point of ``specd.exe``, the command line shipped beside the tray app (see specd-desktop.spec)."""

from frozen_main import run

from specd.desktop.cli import main

run(main)
