"""The verifier's systemd unit for the packaging tests: its settings read as systemd reads them, and its
sandbox applied without systemd as PID 1.

systemd builds most of a unit's sandbox from kernel features that need no init system, so a test can build
the same from the unit's own settings:

- ``SystemCallFilter=``, ``SystemCallErrorNumber=``, ``SystemCallArchitectures=native`` and
  ``RestrictAddressFamilies=`` are one seccomp program: compiled here with libseccomp (through ctypes),
  the groups resolved by ``systemd-analyze syscall-filter`` exactly as systemd resolves them;
- ``DynamicUser=``, ``SupplementaryGroups=``, ``CapabilityBoundingSet=`` (empty) and ``NoNewPrivileges=``
  are ids, groups and capability masks: ``setpriv`` sets them, groups first, as systemd does;
- ``PrivateUsers=``, ``ProtectHostname=``, ``ProtectSystem=strict``, ``ProtectHome=`` and ``PrivateTmp=``
  are namespaces and mounts: ``bwrap`` (bubblewrap) makes them. Its own process namespace and /proc stand
  in for ``ProtectProc=invisible`` (the daemon sees its own processes only).

Left to systemd itself: the device cgroup of ``DevicePolicy=``/``DeviceAllow=`` (the host's /dev is shared
whole here), ``ProtectKernel*=`` and ``ProtectClock=``, and the allocation of the dynamic user (a fixed id
from systemd's dynamic range stands in).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import grp
import os
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

#: An id from the range systemd allocates dynamic users from (61184–65519).
DYNAMIC_ID = 61234

_ACT_KILL_PROCESS = 0x80000000
_ACT_ALLOW = 0x7FFF0000
_CMP_EQ = 4
_ADDRESS_FAMILIES = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6}


def unit_entries(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}, repeated keys kept in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def values(entries: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in entries if k == key]


class _ArgCompare(ctypes.Structure):
    """libseccomp's ``struct scmp_arg_cmp``."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def libseccomp() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp")
    return ctypes.CDLL(name, use_errno=True) if name else None


def syscall_group(systemd_analyze: str, item: str) -> set[str]:
    """The system calls a ``SystemCallFilter=`` item names, nested groups expanded."""
    if not item.startswith("@"):
        return {item}
    listing = subprocess.run([systemd_analyze, "syscall-filter", "--no-pager", item], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    names: set[str] = set()
    for line in listing.splitlines()[1:]:  # the first line is the group's own name
        entry = line.strip()
        if entry and not entry.startswith("#"):
            names |= syscall_group(systemd_analyze, entry)
    return names


def allowed_syscalls(systemd_analyze: str, filters: Sequence[str]) -> set[str]:
    """What repeated ``SystemCallFilter=`` lines allow: an allow list, then ``~`` lines taking calls out."""
    allowed: set[str] = set()
    for value in filters:
        names = set().union(*(syscall_group(systemd_analyze, item) for item in value.lstrip("~").split()))
        allowed = allowed - names if value.startswith("~") else allowed | names
    return allowed


def write_seccomp_program(lib: ctypes.CDLL, path: Path, allowed: set[str], error_number: str | None,
                          address_families: Sequence[str]) -> None:
    """Compile the filter into a BPF program at ``path``, for ``bwrap --seccomp``. Calls outside ``allowed``
    fail with ``error_number`` (killed without one, as under systemd); socket() accepts only
    ``address_families``. Only the native architecture is admitted (libseccomp's default)."""
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCompare)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    refused = 0x00050000 | getattr(errno, error_number) if error_number else _ACT_KILL_PROCESS
    context = lib.seccomp_init(refused)
    assert context, "seccomp_init failed"
    try:
        for name in sorted(allowed - {"socket"}):
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number >= 0:  # names of other architectures resolve to nothing here
                assert lib.seccomp_rule_add_array(context, _ACT_ALLOW, number, 0, None) == 0, name
        if "socket" in allowed:
            number = lib.seccomp_syscall_resolve_name(b"socket")
            for family in address_families:
                condition = _ArgCompare(0, _CMP_EQ, _ADDRESS_FAMILIES[family], 0)
                assert lib.seccomp_rule_add_array(context, _ACT_ALLOW, number, 1, ctypes.byref(condition)) == 0
        with path.open("wb") as program:
            assert lib.seccomp_export_bpf(context, program.fileno()) == 0, "seccomp_export_bpf failed"
    finally:
        lib.seccomp_release(context)


def existing_gids(names: Sequence[str]) -> list[int]:
    """The ids of those of the unit's supplementary groups that this host has (systemd needs them all)."""
    gids = []
    for name in names:
        with contextlib.suppress(KeyError):
            gids.append(grp.getgrnam(name).gr_gid)
    return gids


def sandboxed(command: Sequence[str], *, bwrap: str, seccomp_fd: int, gids: Sequence[int],
              writable: Sequence[Path], readable: Sequence[Path]) -> list[str]:
    """``command`` as the dynamic user with the unit's groups, no capabilities, no new privileges, in its own
    user, process and hostname namespaces, on a read-only root with /home and /root hidden, a private /tmp,
    and only ``writable`` writable (``readable`` are folders under /tmp it also reads)."""
    ids = str(DYNAMIC_ID)
    wrapper = ["setpriv", f"--reuid={ids}", f"--regid={ids}",
               f"--groups={','.join(map(str, gids))}" if gids else "--clear-groups",
               "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"]
    mounts = ["--ro-bind", "/", "/", "--dev-bind", "/dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for hidden in ("/home", "/root"):
        if os.path.isdir(hidden):
            mounts += ["--tmpfs", hidden]
    for folder in readable:
        mounts += ["--ro-bind", str(folder), str(folder)]
    for folder in writable:
        mounts += ["--bind", str(folder), str(folder)]
    return [*wrapper, bwrap, "--unshare-user", "--uid", ids, "--gid", ids, "--unshare-pid", "--unshare-uts",
            "--die-with-parent", *mounts, "--seccomp", str(seccomp_fd), "--", *command]
