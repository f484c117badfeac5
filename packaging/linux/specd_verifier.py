"""Entry point of the ``specd-verifier`` bundle (see specd-verifier.spec)."""

from frozen_main import run

from specd.daemon.cli import main

run(main)
