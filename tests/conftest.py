"""Shared test set-up: offline, headless, and small reusable models."""

from __future__ import annotations

import gc
import os
import tempfile

# Before any library reads them: never reach the hub, render Qt offscreen, keep tokenizers quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The desktop's conversations go to a folder of the test run, never the user's own.
os.environ.setdefault("SPECD_DATA_DIR", tempfile.mkdtemp(prefix="specd-test-data-"))

import pytest
import torch
from hypothesis import settings

from tests.tiny_models import tiny_llama

# CI fuzzes the same examples on every run (derandomised: a red CI is a real regression, reproducible by
# running it again); the random, longer runs are `make reliability`'s (SPECD_FUZZ_EXAMPLES set).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI") == "true" and not os.environ.get("SPECD_FUZZ_EXAMPLES"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_target():
    """A random-init tiny Llama (vocab 64) used as the target in fast tests."""
    return tiny_llama(seed=1)


@pytest.fixture(scope="session")
def tiny_draft():
    """A different random-init tiny Llama (same vocab) used as the draft."""
    return tiny_llama(seed=2)


@pytest.fixture(scope="session")
def smollm2_folder():
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder (prepared once per user cache)."""
    from specd.shared.models import ensure_hf_folder

    return ensure_hf_folder("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def qloop(qapp):
    """A qasync event loop on pytest-qt's QApplication: run the UI's coroutines with
    ``qloop.run_until_complete(...)`` (qtbot does not run ``asyncio`` tasks by itself). Cycles are collected
    on the Qt thread only, as in the app (see specd.desktop.ui.qt_garbage)."""
    import asyncio

    import qasync

    from specd.desktop.ui.qt_garbage import QtThreadCollector

    loop = qasync.QEventLoop(qapp, already_running=False)
    asyncio.set_event_loop(loop)
    with QtThreadCollector():
        yield loop
        loop.close()  # also stops its worker threads
    asyncio.set_event_loop(None)


@pytest.fixture(scope="session", autouse=True)
def _imports_out_of_the_collectors_way():
    """The libraries loaded so far (torch, transformers, Qt) are never garbage: keep the collector from
    walking them on every full collection below."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _qt_objects_freed_on_the_qt_thread(request):
    """After a test that used Qt, its Qt objects caught in cycles are freed here, on the Qt thread: left
    to a later test's worker thread, Qt could not stop their timers and would later crash on them."""
    yield
    if "qapp" in request.fixturenames:
        gc.collect()
