"""Debian tools that packaging tests run, installed with apt-get where they are missing."""

from __future__ import annotations

import os
import shutil
import subprocess


def debian_tool(command: str, package: str) -> str | None:
    """The path of ``command``; where it is missing and this process may install (root, apt-get), Debian's
    ``package`` is installed first (after an ``apt-get update`` if the first try fails). None if it cannot be."""
    if shutil.which(command) or os.geteuid() != 0 or not shutil.which("apt-get"):
        return shutil.which(command)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600",
               package]
    if subprocess.run(install, env=env, capture_output=True, timeout=1200).returncode != 0:
        subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"], env=env, capture_output=True,
                       timeout=1200)
        subprocess.run(install, env=env, capture_output=True, timeout=1200)
    return shutil.which(command)
