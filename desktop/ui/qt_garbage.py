"""Python's cycle collector, run on the Qt thread only while the app runs.

CPython collects reference cycles in whichever thread allocates when a threshold is crossed. The tray app
probes devices, loads models and drafts in worker threads (``asyncio.to_thread`` on qasync's
``QThreadExecutor``), so a Qt object caught in a cycle — a closed dialog, a finished event loop's timer —
could be freed from one of them. Qt cannot stop an object's timers from another thread ("QObject::~QObject:
Timers cannot be stopped from another thread"), so the timer stays registered and later delivers its event
to freed memory: a segmentation fault minutes after the cause. So while the app runs, automatic collection
is off and a timer on the Qt thread collects as often as Python's own thresholds ask; :meth:`stop` collects
once more on the Qt thread and gives collection back to Python.
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QObject, QTimer


class QtThreadCollector(QObject):
    """Collects reference cycles from a timer on the thread that created it (the Qt thread)."""

    def __init__(self, interval_ms: int = 250) -> None:
        super().__init__()
        self._timer = QTimer(self)
        self._timer.setInterval(interval_ms)
        self._timer.timeout.connect(self.collect_due)
        self._was_enabled = False
        self.running = False

    def start(self) -> None:
        if self.running:
            return
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._timer.start()
        self.running = True

    def collect_due(self) -> int:
        """Collect the oldest generation whose count passed its threshold, as CPython would; 0 if none."""
        counts, thresholds = gc.get_count(), gc.get_threshold()
        due = [generation for generation in (2, 1, 0) if counts[generation] > thresholds[generation]]
        return gc.collect(due[0]) if due else 0

    def stop(self) -> None:
        """Collect everything on this thread, then let Python collect again where it did before."""
        if not self.running:
            return
        self._timer.stop()
        self.running = False
        gc.collect()
        if self._was_enabled:
            gc.enable()

    def __enter__(self) -> QtThreadCollector:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
