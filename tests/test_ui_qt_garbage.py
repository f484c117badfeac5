"""Cycles are collected on the Qt thread while the app runs (specd.desktop.ui.qt_garbage): a Qt object in a
cycle is never freed from a worker thread, however much that thread allocates."""

from __future__ import annotations

import gc
import threading
import weakref

from PySide6.QtCore import QObject

from specd.desktop.ui.qt_garbage import QtThreadCollector


def _allocate_cycles(count: int) -> None:
    for _ in range(count):
        cycle: list = []
        cycle.append(cycle)


def test_a_qt_object_in_a_cycle_is_freed_on_the_qt_thread_not_by_a_worker(qtbot):
    freed_in: list[str] = []
    with QtThreadCollector(interval_ms=20) as collector:
        held = QObject()
        held.itself = held  # a cycle: only the collector can free it
        watch = weakref.ref(held, lambda _ref: freed_in.append(threading.current_thread().name))
        del held
        worker = threading.Thread(target=_allocate_cycles, args=(50_000,), name="worker")  # far past the thresholds
        worker.start()
        worker.join()
        assert freed_in == [] and watch() is not None
        qtbot.waitUntil(lambda: bool(freed_in), timeout=5000)  # the collector's timer, on this thread
        assert freed_in == [threading.current_thread().name]
        assert collector.running and not gc.isenabled()
    assert gc.isenabled() and not collector.running


def test_stopping_collects_what_is_left_and_keeps_collection_off_if_it_was_off(qapp):
    gc.disable()
    try:
        freed: list[bool] = []
        with QtThreadCollector(interval_ms=60_000):  # its timer never fires here
            held = QObject()
            held.itself = held
            watch = weakref.ref(held, lambda _ref: freed.append(True))
            del held
            assert watch() is not None
        assert freed == [True] and not gc.isenabled()
    finally:
        gc.enable()
