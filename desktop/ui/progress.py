"""Progress of slow work (device probing, model preparation, precision measurements) for the status bar.

Worker threads post their steps with ``call_soon_threadsafe``, so a step can arrive on the Qt thread
after the work that posted it has ended. Each piece of work is therefore a :class:`ProgressSpan`: once
ended, its late steps are dropped, and the bar stays visible only while some span is still open —
whatever order the messages arrive in. No Qt here: the board drives any ``show(message | None)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger("specd.desktop")

Show = Callable[[str | None], None]  # a step's message; None: no work left, hide the indicator


class ProgressBoard:
    """The open spans of work; ``show`` sees a message per step and None once the last span ends."""

    def __init__(self, show: Show) -> None:
        self._show = show
        self._open: list[ProgressSpan] = []

    @property
    def busy(self) -> bool:
        return bool(self._open)

    def begin(self, message: str | None = None, loop: asyncio.AbstractEventLoop | None = None) -> ProgressSpan:
        """Open a span; ``message`` (when given) is shown at once, otherwise its first step shows."""
        span = ProgressSpan(self, loop or asyncio.get_running_loop())
        self._open.append(span)
        if message is not None:
            self._show(message)
        return span

    def _step(self, span: ProgressSpan, message: str) -> None:
        if span in self._open:
            self._show(message)
        else:
            log.debug("dropped a step that arrived after its work ended: %s", message)

    def _end(self, span: ProgressSpan) -> None:
        if span in self._open:
            self._open.remove(span)
            if not self._open:
                self._show(None)


class ProgressSpan:
    """One piece of work. :meth:`post` may be called from any thread; :meth:`end` on the loop's thread."""

    def __init__(self, board: ProgressBoard, loop: asyncio.AbstractEventLoop) -> None:
        self._board, self._loop = board, loop

    def post(self, message: str) -> None:
        log.info("%s", message)
        with contextlib.suppress(RuntimeError):  # the loop closed while a worker ran: nobody is left to show it
            self._loop.call_soon_threadsafe(self._board._step, self, message)

    def end(self) -> None:
        self._board._end(self)

    def __enter__(self) -> ProgressSpan:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.end()
