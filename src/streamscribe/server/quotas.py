"""Quotas: minutes of audio per UTC day, concurrent streams, and connection-attempt rate limits.

The policy lives here: what is admitted, what is charged, what is refused, and what happens while the
shared store (Redis) is unreachable. The counting itself is in counters.py. Minutes are also written to the
database (see store.py) so a restart loses no usage. A counter that is missing (a new day, a new process, a
Redis that lost its data) starts from what the database holds plus what this process has not written yet,
read when the counter is found missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime

from streamscribe.config import Settings, TierLimits
from streamscribe.protocol import ErrorType, Quota, StreamError, StreamLimitsReport, quota_exceeded
from streamscribe.server.counters import (
    Clock,
    Counters,
    LocalCounters,
    RedisCounters,
    Seed,
    SharedStoreUnavailable,
)
from streamscribe.server.store import KeyStore, StoreBusy

log = logging.getLogger(__name__)

# After the shared counters failed to take a stream's seconds, the next try waits this long.
RESEND_AFTER_SECONDS = 1.0


def utc_day(now: float) -> str:
    """The UTC calendar day of a Unix time: quotas roll over at UTC midnight."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


class UsageLedger:
    """Seconds charged, written to the database in batches; and what the database holds for a day."""

    def __init__(self, store: KeyStore | None, flush_seconds: float) -> None:
        self._store = store
        self._flush_seconds = flush_seconds
        self._unflushed: dict[tuple[str, str], float] = defaultdict(float)
        # Recorded here but not yet in the live counters (a stream's batch on its way): not part of a seed.
        self._uncounted: dict[tuple[str, str], float] = defaultdict(float)
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None

    async def stored(self, user: str, day: str) -> float:
        """Seconds in the database for ``user`` on ``day``."""
        if self._store is None:
            return 0.0
        return await asyncio.to_thread(self._store.usage_seconds, user, day)

    def unflushed(self, user: str, day: str) -> float:
        return self._unflushed.get((user, day), 0.0)

    async def total(self, user: str, day: str) -> float:
        """Seconds in the database plus those charged here and not written yet: the seed of a counter that
        is missing. (Other replicas' unwritten seconds are not known here.)"""
        # Under the flush lock: seconds being written are then either in the database or still unflushed.
        async with self._lock:
            uncounted = self._uncounted.get((user, day), 0.0)
            return await self.stored(user, day) + self.unflushed(user, day) - uncounted

    def seed(self, user: str, day: str) -> Seed:
        """``total`` for one user and day, read only when called (when a counter is found missing)."""
        return lambda: self.total(user, day)

    def record(self, user: str, day: str, seconds: float, in_counters: bool = True) -> None:
        """Add charged seconds; the first call starts the periodic writer. ``in_counters`` False: they reach
        the live counters later (``counted``), so a counter seeded meanwhile must not hold them yet."""
        self._unflushed[(user, day)] += seconds
        if not in_counters:
            self._uncounted[(user, day)] += seconds
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_periodically())

    def counted(self, user: str, day: str, seconds: float) -> None:
        """Seconds recorded with ``in_counters=False`` reached the counters, or never will (then a seed
        should hold them: they are in the database)."""
        left = self._uncounted[(user, day)] - seconds
        if left > 1e-9:
            self._uncounted[(user, day)] = left
        else:
            del self._uncounted[(user, day)]

    async def flush(self) -> None:
        """Write the seconds recorded since the last flush to the database."""
        if self._store is None:
            self._unflushed.clear()
            return
        async with self._lock:
            pending, self._unflushed = dict(self._unflushed), defaultdict(float)
            if not pending:
                return
            try:
                await asyncio.to_thread(self._store.add_usage, pending)
            except Exception as exc:
                if isinstance(exc, StoreBusy):
                    log.warning("could not write usage to the database (%s); will retry", exc)
                else:
                    log.exception("could not write usage to the database; will retry")
                for key, seconds in pending.items():
                    self._unflushed[key] += seconds

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            await self.flush()

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()


class Quotas:
    """Admits streams within their user's limits and charges the audio they receive."""

    def __init__(self, settings: Settings, store: KeyStore | None, clock: Clock = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._usage = UsageLedger(store, settings.usage_flush_seconds)
        self._local = LocalCounters(clock)
        shared = settings.shared_store
        self._redis = (
            RedisCounters(shared.redis_url, shared.timeout_seconds, shared.on_failure)
            if shared.redis_url
            else None
        )
        # fail_open: what each user has used of the allowance on this replica while Redis was unreachable.
        self._allowance = LocalCounters(clock)

    @property
    def shared(self) -> bool:
        return self._redis is not None

    @property
    def shared_store_healthy(self) -> bool:
        return self._redis is None or self._redis.healthy

    @property
    def shared_store_failures(self) -> int:
        return self._redis.failures if self._redis is not None else 0

    @property
    def _counters(self) -> Counters:
        return self._redis or self._local

    async def check_rate(self, kind: str, identity: str, per_minute: int, what: str) -> None:
        """Count a connection attempt; refuse it (rate_limited) past ``per_minute`` (0: no limit)."""
        if per_minute <= 0:
            return
        bucket = f"{kind}:{identity}"
        now = self._clock()
        try:
            count = await self._counters.hit(bucket, now)
        except SharedStoreUnavailable:
            count = await self._local.hit(bucket, now)  # still protect this replica
        if count > per_minute:
            raise StreamError(
                ErrorType.RATE_LIMITED,
                f"too many connection attempts {what}: at most {per_minute} a minute; try again shortly",
            )

    async def open_stream(self, user: str, limits: TierLimits | None, slot: str | None = None) -> StreamLease:
        """A slot for one stream of ``user``, or StreamError: quota_exceeded, or unavailable when the shared
        store is down and the policy is fail_closed. ``limits`` None: count, never refuse. ``slot``: the
        slot's id, a resumed stream's own (it may still be held by the connection the stream left)."""
        day = utc_day(self._clock())
        stream_id = slot or uuid.uuid4().hex
        ttl = self._settings.shared_store.stream_ttl_seconds
        counters = self._counters
        try:
            used = await counters.used(user, day, self._usage.seed(user, day))
            _check_minutes_left(limits, used)
            limit = limits.concurrent_streams if limits else 1 << 30
            if not await counters.acquire_stream(user, stream_id, limit, ttl):
                raise _too_many_streams(limit)
        except SharedStoreUnavailable:
            if self._settings.shared_store.on_failure == "fail_closed":
                raise StreamError(
                    ErrorType.UNAVAILABLE,
                    "usage limits cannot be checked right now (shared store unreachable); try again later",
                ) from None
            return await self._open_on_allowance(
                user, limits, stream_id, day, await self._usage.total(user, day)
            )
        return self._lease(
            user, limits, stream_id, counters, {day: used}, allowance_seconds=None, known_used={day: used}
        )

    async def _open_on_allowance(
        self, user: str, limits: TierLimits | None, stream_id: str, day: str, seed: float
    ) -> StreamLease:
        """fail_open: admit within the small allowance this replica grants while Redis is unreachable."""
        shared = self._settings.shared_store
        _check_minutes_left(limits, seed)
        allowance_seconds = shared.fail_open_minutes * 60
        if await self._allowance.used(user, day, _nothing_used) >= allowance_seconds:
            raise quota_exceeded(
                Quota.DAILY_MINUTES,
                "usage limits cannot be checked right now and this server's allowance is used up; "
                "try again later",
            )
        limit = min(limits.concurrent_streams if limits else 1 << 30, shared.fail_open_streams)
        if not await self._allowance.acquire_stream(user, stream_id, limit, shared.stream_ttl_seconds):
            raise _too_many_streams(limit)
        log.warning("stream admitted on the fail_open allowance (shared quota store unreachable)")
        return self._lease(user, limits, stream_id, self._allowance, {day: seed}, allowance_seconds)

    def _lease(
        self,
        user: str,
        limits: TierLimits | None,
        stream_id: str,
        counters: Counters,
        stored_usage: dict[str, float],
        allowance_seconds: float | None,
        known_used: dict[str, float] | None = None,
    ) -> StreamLease:
        lease = StreamLease(
            user,
            limits,
            stream_id,
            counters=counters,
            usage=self._usage,
            clock=self._clock,
            ttl=self._settings.shared_store.stream_ttl_seconds,
            stored_usage=stored_usage,
            allowance_seconds=allowance_seconds,
            known_used=known_used,
        )
        lease.start_heartbeat()
        return lease

    async def usage_report(self, user: str, limits: TierLimits | None) -> tuple[float, int, bool]:
        """(seconds used today, active streams, whether the shared store answered)."""
        day = utc_day(self._clock())
        counters = self._counters
        try:
            used = await counters.used(user, day, self._usage.seed(user, day))
            active = await counters.active_streams(user)
            return used, active, True
        except SharedStoreUnavailable:
            used = await self._usage.total(user, day)
            return used, await self._allowance.active_streams(user), False

    async def limits_report(
        self, user: str, tier: str, limits: TierLimits | None, may_stream: bool
    ) -> StreamLimitsReport:
        """What ``user`` may use, and has used today; ``may_stream``: the key's scope allows streams."""
        used, active, store_answered = await self.usage_report(user, limits)
        daily = limits.daily_minutes if limits else None
        streams = limits.concurrent_streams if limits else None
        remaining = None if daily is None else max(0.0, daily - used / 60)
        can_start = (
            may_stream
            and (remaining is None or remaining > 0)
            and (streams is None or active < streams)
            and (store_answered or self._settings.shared_store.on_failure == "fail_open")
        )
        return StreamLimitsReport(
            user_id=user,
            tier=tier,
            limits=StreamLimitsReport.Limits(
                daily_minutes=daily,
                concurrent_streams=streams,
                max_frame_bytes=self._settings.streaming.max_frame_bytes,
            ),
            used_today_minutes=round(used / 60, 4),
            remaining_minutes=None if remaining is None else round(remaining, 4),
            active_streams=active,
            can_start_stream=can_start,
        )

    async def close(self) -> None:
        await self._usage.close()
        if self._redis is not None:
            await self._redis.close()


class StreamLease:
    """One admitted stream: holds its slot (refreshed while open) and charges the audio it receives.

    A frame is checked against the day's total as last known plus what this stream has charged since, and
    the seconds go to the counters in the background, one batch at a time (whatever came in while the
    previous batch was on its way): a slow or hung Redis never holds up a frame. A batch whose answer is
    lost is sent again under its number, which Redis adds once.

    Args:
        stream_id: The slot's id. A resumed stream's connections share it; each counts its own batches.
        counters: Where the slot and the minutes are counted: the shared counters, or this replica's
            fail_open allowance.
        usage: Records what is charged, for the database; gives the stored minutes of a new day.
        ttl: Seconds a slot lives unless refreshed.
        stored_usage: Day -> the day's usage when first seen (what is known if Redis goes away first).
        allowance_seconds: What a user may use per day on the fail_open allowance; None: not on it.
        known_used: Day -> the day's total as the counters gave it when the stream was admitted.
    """

    def __init__(
        self,
        user: str,
        limits: TierLimits | None,
        stream_id: str,
        *,
        counters: Counters,
        usage: UsageLedger,
        clock: Clock,
        ttl: float,
        stored_usage: dict[str, float],
        allowance_seconds: float | None,
        known_used: dict[str, float] | None = None,
    ) -> None:
        self._user = user
        self._limits = limits
        self._stream_id = stream_id
        self._batch_prefix = uuid.uuid4().hex  # this connection's batches: numbered from 1 like every other
        self._counters = counters
        self._usage = usage
        self._clock = clock
        self._ttl = ttl
        self._stored_usage = stored_usage
        self._allowance_seconds = allowance_seconds
        self._known_used = dict(known_used or {})  # day -> the last total the counters gave
        self._unsent: dict[str, float] = defaultdict(float)  # day -> seconds charged, in no batch yet
        self._batch: tuple[int, str, float] | None = None  # (number, day, seconds) on its way
        self._batches = 0
        self._sender: asyncio.Task[None] | None = None
        self._resend_at = 0.0  # monotonic time before which a failed batch is not sent again
        self._refundable: dict[str, float] = {}  # day -> seconds charge_if_fits charged (files)
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        self._handed_over = False

    @property
    def heartbeat_seconds(self) -> float:
        """How often the slot is refreshed (the stream's key is re-checked as often: see stream.py)."""
        return self._ttl / 3

    def start_heartbeat(self) -> None:
        self._heartbeat = asyncio.create_task(self._refresh_periodically())

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            with contextlib.suppress(SharedStoreUnavailable):
                await self._counters.refresh_stream(self._user, self._stream_id, self._ttl)

    async def charge(self, seconds: float) -> None:
        """Charge received audio; StreamError (quota_exceeded) when it would pass the daily limit."""
        day = utc_day(self._clock())
        if day not in self._stored_usage:  # the stream crossed UTC midnight
            self._stored_usage[day] = await self._usage.stored(self._user, day)
        seed = self._stored_usage[day]
        limit = _daily_seconds(self._limits)
        if self._allowance_seconds is not None:
            # Bounded by the fail_open allowance, and by the tier as far as the database knows.
            allowance = self._allowance_seconds
            if limit is not None:
                allowance = min(allowance, max(0.0, limit - seed))
            charge = await self._counters.charge(self._user, day, seconds, allowance, _nothing_used)
            self._usage.record(self._user, day, charge.added)
            if not charge.accepted:
                raise _minutes_used_up(self._limits)
            return
        # While Redis is away this goes on against what was last known.
        used = self._known_used.get(day, seed) + self._unsent.get(day, 0.0)
        if self._batch is not None and self._batch[1] == day:
            used += self._batch[2]
        fits = limit is None or used + seconds <= limit
        added = seconds if fits else max(0.0, (limit or 0.0) - used)
        if added:
            self._unsent[day] += added
            self._usage.record(self._user, day, added, in_counters=False)
            if (self._sender is None or self._sender.done()) and time.monotonic() >= self._resend_at:
                self._sender = asyncio.create_task(self._send_batches())
        if not fits:
            raise _minutes_used_up(self._limits)

    async def _send_batches(self) -> None:
        """Add the seconds charged to the counters, a batch at a time, until none is left or one fails."""
        while self._batch is not None or self._unsent:
            if self._batch is None:
                day, seconds = self._unsent.popitem()
                self._batches += 1
                self._batch = (self._batches, day, seconds)
            number, day, seconds = self._batch
            try:
                total = await self._counters.add_batch(
                    self._user, day, seconds, self._usage.seed(self._user, day), (self._batch_prefix, number)
                )
            except SharedStoreUnavailable:
                self._resend_at = time.monotonic() + RESEND_AFTER_SECONDS
                return
            self._batch = None
            self._known_used[day] = total
            self._usage.counted(self._user, day, seconds)

    async def give_back(self, seconds: float) -> None:
        """Take back ``seconds`` this stream charged that another connection charges again (the audio a
        resumed stream resends, when this one learned it was resumed only after): counted like any
        charge, negated."""
        if seconds > 0:
            await self.charge(-seconds)

    @property
    def slot(self) -> str:
        return self._stream_id

    def hand_over(self) -> None:
        """The stream was resumed on another connection, which holds this slot now: ``close`` keeps it."""
        self._handed_over = True

    async def close(self) -> None:
        """Free the slot (unless handed over) and write the usage out."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._sender is not None:
            await self._sender
        if time.monotonic() >= self._resend_at:  # one last try, unless one has just failed
            await self._send_batches()
        # What did not reach the counters never will: it is in the database, where a seed reads it.
        undelivered = [*self._unsent.items(), *([self._batch[1:]] if self._batch else [])]
        for day, seconds in undelivered:
            self._usage.counted(self._user, day, seconds)
        if not self._handed_over:
            with contextlib.suppress(SharedStoreUnavailable):
                await self._counters.release_stream(self._user, self._stream_id)
        await self._usage.flush()

    # Files: refused without side effects, and refunded when they fail (see openai_api.py). A stream's
    # ``charge`` above spends what is left of the day on a frame that does not fit; a file is checked first.

    async def remaining_seconds(self) -> float | None:
        """Seconds this stream may still be charged today (None: no limit); changes nothing."""
        day, limit, seed = await self._file_terms()
        try:
            used = await self._counters.used(self._user, day, seed)
        except SharedStoreUnavailable:
            raise _store_unreachable() from None
        return None if limit is None else max(0.0, limit - used)

    async def charge_if_fits(self, seconds: float) -> None:
        """Charge received audio when it fits what is left today; else StreamError (quota_exceeded), and
        nothing is charged."""
        day, limit, seed = await self._file_terms()
        try:
            charge = await self._counters.charge_if_fits(self._user, day, seconds, limit, seed)
        except SharedStoreUnavailable:
            raise _store_unreachable() from None
        if not charge.accepted:
            raise _minutes_used_up(self._limits)
        self._usage.record(self._user, day, charge.added)
        self._refundable[day] = self._refundable.get(day, 0.0) + charge.added

    async def refund(self, seconds: float) -> None:
        """Take back up to ``seconds`` of what ``charge_if_fits`` charged, the latest day first."""
        for day in reversed(list(self._refundable)):
            amount = min(seconds, self._refundable[day])
            if amount <= 0:
                continue
            try:
                await self._counters.refund(self._user, day, amount, self._refund_seed(day))
            except SharedStoreUnavailable:
                log.warning("could not refund %.1f s of audio: shared quota store unreachable", amount)
                return
            self._usage.record(self._user, day, -amount)
            self._refundable[day] -= amount
            seconds -= amount

    def _refund_seed(self, day: str) -> Seed:
        return _nothing_used if self._allowance_seconds is not None else self._usage.seed(self._user, day)

    async def _file_terms(self) -> tuple[str, float | None, Seed]:
        """Today's day, the limit to charge against and the seed, as ``charge`` has them."""
        day = utc_day(self._clock())
        if day not in self._stored_usage:
            self._stored_usage[day] = await self._usage.stored(self._user, day)
        stored = self._stored_usage[day]
        limit = _daily_seconds(self._limits)
        if self._allowance_seconds is None:
            return day, limit, self._usage.seed(self._user, day)
        # On the fail_open allowance (counted from zero): bounded by it, and by the tier as far as the
        # database knows.
        allowance = self._allowance_seconds
        return day, allowance if limit is None else min(allowance, max(0.0, limit - stored)), _nothing_used


async def _nothing_used() -> float:
    """The seed of the fail_open allowance: it counts only what this replica admits."""
    return 0.0


def _daily_seconds(limits: TierLimits | None) -> float | None:
    if limits is None or limits.daily_minutes is None:
        return None
    return limits.daily_minutes * 60


def _check_minutes_left(limits: TierLimits | None, used_seconds: float) -> None:
    limit = _daily_seconds(limits)
    if limit is not None and used_seconds >= limit:
        raise _minutes_used_up(limits)


def _minutes_used_up(limits: TierLimits | None) -> StreamError:
    minutes = limits.daily_minutes if limits and limits.daily_minutes is not None else 0
    message = f"daily quota of {minutes:g} minutes used up; it resets at 00:00 UTC"
    return quota_exceeded(Quota.DAILY_MINUTES, message)


def _store_unreachable() -> StreamError:
    message = "usage limits cannot be checked right now (shared store unreachable); try again later"
    return StreamError(ErrorType.UNAVAILABLE, message)


def _too_many_streams(limit: int) -> StreamError:
    plural = "s" if limit != 1 else ""
    message = f"at most {limit} concurrent stream{plural} for this key's tier"
    return quota_exceeded(Quota.CONCURRENT_STREAMS, message)
