"""An exclusive lock between processes (and threads) on one cache entry, so two never build it together.

``make demo`` starts the verifier and prepares the draft at the same time, and both may need the same
model folder: the first takes the lock and builds, the second waits, then finds the folder complete.
The lock is ``flock`` on a ``<entry>.lock`` file beside the entry (``msvcrt.locking`` on Windows); the
operating system releases it when its holder exits, even when killed, so a crash never leaves it held.
The file itself stays (deleting it would let a third process lock a different file).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

_WINDOWS_RETRY_S = 0.2


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock file ``path``; ``on_wait`` is called once when another holder makes us wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        if not _try_lock(fh):
            if on_wait is not None:
                on_wait()
            _lock(fh)
        try:
            yield
        finally:
            _unlock(fh)


if sys.platform == "win32":
    import msvcrt

    def _try_lock(fh: IO[bytes]) -> bool:
        fh.seek(0)
        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _lock(fh: IO[bytes]) -> None:
        while not _try_lock(fh):  # LK_LOCK gives up after 10 s; a model build takes longer
            time.sleep(_WINDOWS_RETRY_S)

    def _unlock(fh: IO[bytes]) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(fh: IO[bytes]) -> bool:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _lock(fh: IO[bytes]) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)

    def _unlock(fh: IO[bytes]) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
