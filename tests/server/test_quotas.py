"""Quota counting with a real SQLite store and a clock the test moves (the corners a live server cannot
reach quickly: UTC midnight)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from streamscribe.config import Settings, TierLimits
from streamscribe.protocol import CloseCode, Quota, StreamError
from streamscribe.server.quotas import Quotas, utc_day
from streamscribe.server.store import open_store


class MovableClock:
    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now


def test_utc_day_is_the_utc_calendar_day() -> None:
    assert utc_day(datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC).timestamp()) == "2026-03-01"
    assert utc_day(datetime(2026, 3, 2, 0, 0, 0, tzinfo=UTC).timestamp()) == "2026-03-02"


def test_minutes_roll_over_at_utc_midnight_and_reach_the_database(tmp_path: Path) -> None:
    settings = Settings(auth_mode="multi_user", data_dir=tmp_path)
    store = open_store(settings)
    clock = MovableClock(datetime(2026, 3, 1, 23, 59, 58, tzinfo=UTC))
    limits = TierLimits(daily_minutes=0.05, concurrent_streams=1)  # 3 s a day

    async def scenario() -> None:
        quotas = Quotas(settings, store, clock)
        lease = await quotas.open_stream("alice", limits)
        for _ in range(2):
            await lease.charge(1.0)
        await lease.charge(0.5)
        with pytest.raises(StreamError) as refused:
            await lease.charge(1.0)  # would pass 3 s on March 1st
        assert refused.value.quota == Quota.DAILY_MINUTES
        assert refused.value.close_code == CloseCode.QUOTA_EXCEEDED
        clock.now += 3  # 00:00:01 UTC, March 2nd: a new day, the same stream goes on
        await lease.charge(1.0)
        await lease.close()
        assert await quotas.usage_report("alice", limits) == (1.0, 0, True)
        await quotas.close()

    asyncio.run(scenario())
    assert store.usage_seconds("alice", "2026-03-01") == pytest.approx(3.0)
    assert store.usage_seconds("alice", "2026-03-02") == pytest.approx(1.0)
    store.close()


def test_a_restarted_process_starts_from_the_stored_minutes(tmp_path: Path) -> None:
    settings = Settings(auth_mode="multi_user", data_dir=tmp_path)
    store = open_store(settings)
    store.add_usage({("alice", utc_day(0.0)): 170.0})
    limits = TierLimits(daily_minutes=3.0, concurrent_streams=1)

    async def scenario() -> None:
        quotas = Quotas(settings, store, clock=lambda: 0.0)
        lease = await quotas.open_stream("alice", limits)
        await lease.charge(10.0)
        with pytest.raises(StreamError):
            await lease.charge(0.1)
        await lease.close()
        with pytest.raises(StreamError) as refused:
            await quotas.open_stream("alice", limits)
        assert refused.value.quota == Quota.DAILY_MINUTES
        await quotas.close()

    asyncio.run(scenario())
    assert store.usage_seconds("alice", utc_day(0.0)) == pytest.approx(180.0)
    store.close()
