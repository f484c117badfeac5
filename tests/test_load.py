"""The short CI version of the load run (``make reliability`` runs 64 sessions for 60 s)."""

from __future__ import annotations

import math

import pytest

from tests.load import run_load, summary

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


async def test_eight_sessions_for_five_seconds_without_errors_and_bounded_memory():
    result = await run_load(sessions=8, duration_s=5.0)
    assert result.errors == []
    assert result.requests >= 8 and result.rounds > 0 and result.tokens > result.rounds
    assert result.connections > 8, "sessions reconnect during the run"
    assert math.isfinite(result.percentile(0.99)) and result.percentile(0.50) <= result.percentile(0.99)
    assert result.rss_kib and result.rss_bounded, summary(result)
