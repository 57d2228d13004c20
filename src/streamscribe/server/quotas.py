"""Quotas: minutes of audio per UTC day, concurrent streams, and connection-attempt rate limits.

Live counters sit in this process (one replica) or in Redis (several replicas share them). Minutes are also
written to the database (see store.py) so a restart loses no usage; the database seeds a counter that is
missing (a new process, a Redis that lost its data).

Redis keys (``ss:`` prefix):
    ss:streams:{user}          sorted set: one member per open stream, scored by the time (ms, Redis clock)
                               its slot expires; a replica refreshes its streams' scores while they run,
                               so the slots of a crashed replica lapse after ``stream_ttl_seconds``.
    ss:usage:{user}:{day}      seconds of audio used that UTC day (float), kept for two days.
    ss:rate:{kind}:{id}:{win}  connection attempts in one minute window (key id or address).
Every check-and-change is one Lua script, so replicas never race each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol, TypeVar

from streamscribe.config import Settings, TierLimits
from streamscribe.protocol import CloseCode, ErrorType, Quota, StreamError, quota_exceeded
from streamscribe.server.store import KeyStore

log = logging.getLogger(__name__)

Clock = Callable[[], float]
T = TypeVar("T")

USAGE_TTL_SECONDS = 2 * 86400
RATE_WINDOW_SECONDS = 60


def utc_day(now: float) -> str:
    """The UTC calendar day of a Unix time: quotas roll over at UTC midnight."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


class Charge(NamedTuple):
    """What charging one frame did: whether it fitted, the seconds added, and the day's new total."""

    accepted: bool
    added: float
    total: float


class SharedStoreUnavailable(Exception):
    """Redis did not answer (down, unreachable, or too slow)."""


class Counters(Protocol):
    """Live quota counters, in this process or shared by replicas."""

    async def acquire_stream(self, user: str, stream_id: str, limit: int, ttl: float) -> bool:
        """Take a stream slot unless ``limit`` are taken."""
        ...

    async def refresh_stream(self, user: str, stream_id: str, ttl: float) -> None: ...

    async def release_stream(self, user: str, stream_id: str) -> None: ...

    async def active_streams(self, user: str) -> int: ...

    async def charge(self, user: str, day: str, seconds: float, limit: float | None, seed: float) -> Charge:
        """Add ``seconds`` to the day's usage. When that would pass ``limit`` the frame is refused and the
        usage set to the limit: what was left cannot be used by a frame that does not fit, and the next
        stream is refused at once. ``seed`` is the day's usage from the database, used when the counter
        does not exist yet."""
        ...

    async def used(self, user: str, day: str, seed: float) -> float: ...

    async def hit(self, bucket: str, now: float) -> int:
        """Count one attempt in ``bucket`` in the current minute; the count so far this minute."""
        ...


class LocalCounters:
    """Counters in this process: right for one replica, and for the fail_open allowance."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._streams: dict[str, dict[str, float]] = defaultdict(dict)  # user -> stream id -> expiry
        self._usage: dict[tuple[str, str], float] = {}
        self._hits: dict[str, tuple[int, int]] = {}  # bucket -> (window, count)

    def _live(self, user: str) -> dict[str, float]:
        now = self._clock()
        streams = self._streams[user]
        for stream_id in [s for s, expiry in streams.items() if expiry <= now]:
            del streams[stream_id]
        return streams

    async def acquire_stream(self, user: str, stream_id: str, limit: int, ttl: float) -> bool:
        streams = self._live(user)
        if len(streams) >= limit:
            return False
        streams[stream_id] = self._clock() + ttl
        return True

    async def refresh_stream(self, user: str, stream_id: str, ttl: float) -> None:
        self._streams[user][stream_id] = self._clock() + ttl

    async def release_stream(self, user: str, stream_id: str) -> None:
        self._streams[user].pop(stream_id, None)

    async def active_streams(self, user: str) -> int:
        return len(self._live(user))

    async def charge(self, user: str, day: str, seconds: float, limit: float | None, seed: float) -> Charge:
        used = self._usage.setdefault((user, day), seed)
        if limit is not None and used + seconds > limit:
            self._usage[(user, day)] = max(used, limit)
            return Charge(False, max(0.0, limit - used), max(used, limit))
        self._usage[(user, day)] = used + seconds
        return Charge(True, seconds, used + seconds)

    async def used(self, user: str, day: str, seed: float) -> float:
        return self._usage.setdefault((user, day), seed)

    async def hit(self, bucket: str, now: float) -> int:
        window = int(now // RATE_WINDOW_SECONDS)
        previous_window, count = self._hits.get(bucket, (window, 0))
        count = count + 1 if previous_window == window else 1
        self._hits[bucket] = (window, count)
        return count


# Every replica reads the time from Redis, so their clocks need not agree.
_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_ACQUIRE_STREAM = _NOW_MS + """redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

_REFRESH_STREAM = _NOW_MS + """redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

_ACTIVE_STREAMS = _NOW_MS + """return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""

# ARGV: seconds, limit (negative: none), seed, ttl. Returns {accepted, added, total} (numbers as strings:
# Lua numbers would reach Python as integers).
_CHARGE = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4]) end
local used = tonumber(redis.call('GET', KEYS[1]))
local limit = tonumber(ARGV[2])
if limit >= 0 and used + tonumber(ARGV[1]) > limit then
  if used >= limit then return {0, '0', tostring(used)} end
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return {0, tostring(limit - used), ARGV[2]}
end
local total = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1, ARGV[1], total}
"""

_USED = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
return redis.call('GET', KEYS[1])
"""

_HIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""


class RedisCounters:
    """Counters in Redis, shared by every replica that points at it."""

    def __init__(self, url: str, timeout: float) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries: a dead Redis must be noticed within ``timeout``, not after seconds of backoff.
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._timeout = timeout
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in {
                "acquire": _ACQUIRE_STREAM,
                "refresh": _REFRESH_STREAM,
                "active": _ACTIVE_STREAMS,
                "charge": _CHARGE,
                "used": _USED,
                "hit": _HIT,
            }.items()
        }

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await asyncio.wait_for(self._scripts[name](keys=keys, args=args), self._timeout * 2)
        except self._errors as exc:
            raise SharedStoreUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def acquire_stream(self, user: str, stream_id: str, limit: int, ttl: float) -> bool:
        return bool(await self._call("acquire", [f"ss:streams:{user}"], [limit, stream_id, int(ttl * 1000)]))

    async def refresh_stream(self, user: str, stream_id: str, ttl: float) -> None:
        await self._call("refresh", [f"ss:streams:{user}"], [stream_id, int(ttl * 1000)])

    async def release_stream(self, user: str, stream_id: str) -> None:
        try:
            await asyncio.wait_for(self._redis.zrem(f"ss:streams:{user}", stream_id), self._timeout * 2)
        except self._errors as exc:
            raise SharedStoreUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def active_streams(self, user: str) -> int:
        return int(await self._call("active", [f"ss:streams:{user}"], []))

    async def charge(self, user: str, day: str, seconds: float, limit: float | None, seed: float) -> Charge:
        accepted, added, total = await self._call(
            "charge",
            [f"ss:usage:{user}:{day}"],
            [repr(seconds), -1 if limit is None else repr(limit), repr(seed), USAGE_TTL_SECONDS],
        )
        return Charge(bool(int(accepted)), float(added), float(total))

    async def used(self, user: str, day: str, seed: float) -> float:
        return float(await self._call("used", [f"ss:usage:{user}:{day}"], [repr(seed), USAGE_TTL_SECONDS]))

    async def hit(self, bucket: str, now: float) -> int:
        window = int(now // RATE_WINDOW_SECONDS)
        return int(await self._call("hit", [f"ss:rate:{bucket}:{window}"], [RATE_WINDOW_SECONDS + 1]))

    async def close(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._redis.aclose()


class Quotas:
    """Admits streams within their user's limits and charges the audio they receive."""

    def __init__(self, settings: Settings, store: KeyStore | None, clock: Clock = time.time) -> None:
        self._settings = settings
        self._store = store
        self._clock = clock
        self._local = LocalCounters(clock)
        shared = settings.shared_store
        self._redis = RedisCounters(shared.redis_url, shared.timeout_seconds) if shared.redis_url else None
        # fail_open: what each user has used of the allowance on this replica while Redis was unreachable.
        self._allowance = LocalCounters(clock)
        self._unflushed: dict[tuple[str, str], float] = defaultdict(float)
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self.shared_store_failures = 0
        self.shared_store_healthy = True

    @property
    def shared(self) -> bool:
        return self._redis is not None

    @property
    def _counters(self) -> Counters:
        return self._redis or self._local

    async def _shared_call(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a Redis call; count and log failures (once per outage), and the recovery."""
        try:
            result = await call()
        except SharedStoreUnavailable as exc:
            self.shared_store_failures += 1
            if self.shared_store_healthy:
                self.shared_store_healthy = False
                policy = self._settings.shared_store.on_failure
                log.error("shared quota store unreachable (%s); policy %s", exc, policy)
            raise
        if not self.shared_store_healthy:
            self.shared_store_healthy = True
            failures = self.shared_store_failures
            log.warning("shared quota store reachable again (%d failed calls so far)", failures)
        return result

    async def _stored_usage(self, user: str, day: str) -> float:
        if self._store is None:
            return 0.0
        return await asyncio.to_thread(self._store.usage_seconds, user, day)

    async def check_rate(self, kind: str, identity: str, per_minute: int, what: str) -> None:
        """Count a connection attempt; refuse it (4429) past ``per_minute`` (0: no limit)."""
        if per_minute <= 0:
            return
        bucket = f"{kind}:{identity}"
        now = self._clock()
        try:
            count = await self._shared_call(lambda: self._counters.hit(bucket, now))
        except SharedStoreUnavailable:
            count = await self._local.hit(bucket, now)  # still protect this replica
        if count > per_minute:
            raise StreamError(
                ErrorType.RATE_LIMITED,
                f"too many connection attempts {what}: at most {per_minute} a minute; try again shortly",
                CloseCode.RATE_LIMITED,
            )

    async def open_stream(self, user: str, limits: TierLimits | None) -> StreamLease:
        """A slot for one stream of ``user``, or StreamError: quota_exceeded (4003), or the shared store is
        down and the policy is fail_closed (1013). ``limits`` None: count, never refuse."""
        self._start_flusher()
        now = self._clock()
        day = utc_day(now)
        seed = await self._stored_usage(user, day)
        stream_id = uuid.uuid4().hex
        ttl = self._settings.shared_store.stream_ttl_seconds
        counters = self._counters
        try:
            used = await self._shared_call(lambda: counters.used(user, day, seed))
            _check_minutes_left(limits, used)
            limit = limits.concurrent_streams if limits else 1 << 30
            if not await self._shared_call(lambda: counters.acquire_stream(user, stream_id, limit, ttl)):
                raise _too_many_streams(limit)
        except SharedStoreUnavailable:
            if self._settings.shared_store.on_failure == "fail_closed":
                raise StreamError(
                    ErrorType.UNAVAILABLE,
                    "usage limits cannot be checked right now (shared store unreachable); try again later",
                    CloseCode.TRY_AGAIN_LATER,
                ) from None
            return await self._open_on_allowance(user, limits, stream_id, day, seed)
        lease = StreamLease(self, user, limits, stream_id, counters, {day: seed}, on_allowance=False)
        lease.start_heartbeat()
        return lease

    async def _open_on_allowance(
        self, user: str, limits: TierLimits | None, stream_id: str, day: str, seed: float
    ) -> StreamLease:
        """fail_open: admit within the small allowance this replica grants while Redis is unreachable."""
        shared = self._settings.shared_store
        _check_minutes_left(limits, seed)
        allowance_used = await self._allowance.used(user, day, 0.0)
        if allowance_used >= shared.fail_open_minutes * 60:
            raise quota_exceeded(
                Quota.DAILY_MINUTES,
                "usage limits cannot be checked right now and this server's allowance is used up; "
                "try again later",
            )
        limit = min(limits.concurrent_streams if limits else 1 << 30, shared.fail_open_streams)
        if not await self._allowance.acquire_stream(user, stream_id, limit, shared.stream_ttl_seconds):
            raise _too_many_streams(limit)
        log.warning("stream admitted on the fail_open allowance (shared quota store unreachable)")
        lease = StreamLease(self, user, limits, stream_id, self._allowance, {day: seed}, on_allowance=True)
        lease.start_heartbeat()
        return lease

    async def usage_report(self, user: str, limits: TierLimits | None) -> tuple[float, int, bool]:
        """(seconds used today, active streams, whether the shared store answered)."""
        day = utc_day(self._clock())
        seed = await self._stored_usage(user, day)
        counters = self._counters
        try:
            used = await self._shared_call(lambda: counters.used(user, day, seed))
            active = await self._shared_call(lambda: counters.active_streams(user))
            return used, active, True
        except SharedStoreUnavailable:
            used = seed + self._unflushed.get((user, day), 0.0)
            return used, await self._allowance.active_streams(user), False

    def record_usage(self, user: str, day: str, seconds: float) -> None:
        self._unflushed[(user, day)] += seconds

    async def flush_usage(self) -> None:
        """Write minutes charged since the last flush to the database."""
        if self._store is None:
            self._unflushed.clear()
            return
        async with self._flush_lock:
            pending, self._unflushed = dict(self._unflushed), defaultdict(float)
            if not pending:
                return
            try:
                await asyncio.to_thread(self._store.add_usage, pending)
            except Exception:
                log.exception("could not write usage to the database; will retry")
                for key, seconds in pending.items():
                    self._unflushed[key] += seconds

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_periodically())

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._settings.usage_flush_seconds)
            await self.flush_usage()

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush_usage()
        if self._redis is not None:
            await self._redis.close()


class StreamLease:
    """One admitted stream: holds its slot (refreshed while open) and charges the audio it receives."""

    def __init__(
        self,
        quotas: Quotas,
        user: str,
        limits: TierLimits | None,
        stream_id: str,
        counters: Counters,
        stored_usage: dict[str, float],
        on_allowance: bool,
    ) -> None:
        self._quotas = quotas
        self._user = user
        self._limits = limits
        self._stream_id = stream_id
        self._counters = counters
        self._stored_usage = stored_usage  # day -> seconds in the database when first seen
        self._known_used: dict[str, float] = {}  # day -> last total seen in the counters, or estimated
        self._unsynced: dict[str, float] = defaultdict(float)  # day -> seconds charged while Redis was away
        self._on_allowance = on_allowance
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        # The fail_open allowance lives in this process: its calls say nothing about Redis's health.
        return await call() if self._on_allowance else await self._quotas._shared_call(call)

    def start_heartbeat(self) -> None:
        self._heartbeat = asyncio.create_task(self._refresh_periodically())

    async def _refresh_periodically(self) -> None:
        ttl = self._quotas._settings.shared_store.stream_ttl_seconds
        while True:
            await asyncio.sleep(ttl / 3)
            with contextlib.suppress(SharedStoreUnavailable):
                await self._call(lambda: self._counters.refresh_stream(self._user, self._stream_id, ttl))

    async def charge(self, seconds: float) -> None:
        """Charge received audio; StreamError (quota_exceeded, 4003) when it would pass the daily limit."""
        day = utc_day(self._quotas._clock())
        if day not in self._stored_usage:  # the stream crossed UTC midnight
            self._stored_usage[day] = await self._quotas._stored_usage(self._user, day)
        seed = self._stored_usage[day]
        limit = _daily_seconds(self._limits)
        if self._on_allowance:
            # Bounded by the fail_open allowance, and by the tier as far as the database knows.
            allowance = self._quotas._settings.shared_store.fail_open_minutes * 60
            if limit is not None:
                allowance = min(allowance, max(0.0, limit - seed))
            charge = await self._counters.charge(self._user, day, seconds, allowance, 0.0)
        else:
            try:
                if self._unsynced.get(day):
                    backlog = self._unsynced.pop(day)
                    await self._call(lambda: self._counters.charge(self._user, day, backlog, None, seed))
                charge = await self._call(
                    lambda: self._counters.charge(self._user, day, seconds, limit, seed)
                )
            except SharedStoreUnavailable:
                # A running stream goes on while Redis is away, checked against what was last known.
                used = self._known_used.get(day, seed)
                fits = limit is None or used + seconds <= limit
                added = seconds if fits else max(0.0, (limit or 0.0) - used)
                charge = Charge(fits, added, used + added)
                self._unsynced[day] += added
            self._known_used[day] = charge.total
        self._quotas.record_usage(self._user, day, charge.added)
        if not charge.accepted:
            raise _minutes_used_up(self._limits)

    async def close(self) -> None:
        """Free the slot and write the usage out."""
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        with contextlib.suppress(SharedStoreUnavailable):
            await self._call(lambda: self._counters.release_stream(self._user, self._stream_id))
        await self._quotas.flush_usage()


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


def _too_many_streams(limit: int) -> StreamError:
    plural = "s" if limit != 1 else ""
    message = f"at most {limit} concurrent stream{plural} for this key's tier"
    return quota_exceeded(Quota.CONCURRENT_STREAMS, message)
