"""Quota counting with a real SQLite store and a clock the test moves (the corners a live server cannot
reach quickly: UTC midnight)."""

from __future__ import annotations

import asyncio
import socket
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


def unreachable_redis(tmp_path: Path, **shared_store: object) -> Settings:
    """Settings whose Redis URL points at a loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return Settings(
        auth_mode="multi_user",
        data_dir=tmp_path,
        shared_store={"redis_url": f"redis://127.0.0.1:{port}/0", "timeout_seconds": 0.5, **shared_store},
    )


def test_fail_closed_refuses_new_streams_when_redis_is_unreachable(tmp_path: Path) -> None:
    settings = unreachable_redis(tmp_path)

    async def scenario() -> Quotas:
        quotas = Quotas(settings, None)
        with pytest.raises(StreamError) as refused:
            await quotas.open_stream("alice", TierLimits(daily_minutes=30, concurrent_streams=1))
        assert refused.value.close_code == CloseCode.TRY_AGAIN_LATER
        await quotas.close()
        return quotas

    quotas = asyncio.run(scenario())
    assert quotas.shared_store_failures >= 1 and not quotas.shared_store_healthy


def test_fail_open_admits_within_a_bounded_allowance(tmp_path: Path) -> None:
    settings = unreachable_redis(
        tmp_path, on_failure="fail_open", fail_open_streams=1, fail_open_minutes=0.05
    )
    limits = TierLimits(daily_minutes=30, concurrent_streams=3)

    async def scenario() -> None:
        quotas = Quotas(settings, None)
        lease = await quotas.open_stream("alice", limits)
        with pytest.raises(StreamError) as second:  # the allowance is one stream, whatever the tier says
            await quotas.open_stream("alice", limits)
        assert second.value.quota == Quota.CONCURRENT_STREAMS
        await lease.charge(2.0)
        with pytest.raises(StreamError) as over:  # and 3 s of audio
            await lease.charge(2.0)
        assert over.value.quota == Quota.DAILY_MINUTES
        await lease.close()
        with pytest.raises(StreamError) as spent:
            await quotas.open_stream("alice", limits)
        assert spent.value.quota == Quota.DAILY_MINUTES
        bob = await quotas.open_stream("bob", limits)  # the allowance is per user
        await bob.close()
        await quotas.close()

    asyncio.run(scenario())
