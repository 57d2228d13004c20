"""Live quota counters: stream slots, seconds used per UTC day, connection attempts per minute.

They sit in this process (one replica) or in Redis (several replicas share them); quotas.py decides what
to count and what to refuse.

Redis keys (``ss:`` prefix):
    ss:streams:{user}          sorted set: one member per open stream, scored by the time (ms, Redis clock)
                               its slot expires; a replica refreshes its streams' scores while they run,
                               so the slots of a crashed replica lapse after ``stream_ttl_seconds``.
    ss:usage:{user}:{day}      seconds of audio used that UTC day (float), kept for two days.
    ss:rate:{kind}:{id}:{win}  connection attempts in one minute window (key id or address).
    ss:charged:{stream}        the number of the last batch of a stream's seconds added to its usage, so
                               that a batch sent again (its answer lost to a timeout) is not added twice.
Every check-and-change is one Lua script, so replicas never race each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol, TypeVar

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Batch = tuple[str, int]  # (stream id, batch number): a stream's batches are numbered from 1 up
T = TypeVar("T")

USAGE_TTL_SECONDS = 2 * 86400
BATCH_TTL_SECONDS = 3600  # how long a stream's last batch number is kept after its last batch
RATE_WINDOW_SECONDS = 60


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

    async def add_batch(self, user: str, day: str, seconds: float, seed: float, batch: Batch) -> float:
        """Add a stream's ``batch`` of seconds to the day's usage, whatever the limit; the day's total. A
        batch is added once: sent again (its first answer was lost), it only returns the total."""
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

    async def add_batch(self, user: str, day: str, seconds: float, seed: float, batch: Batch) -> float:
        # A call in this process never loses its answer, so no batch comes twice.
        return (await self.charge(user, day, seconds, None, seed)).total

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

_ACQUIRE_STREAM = (
    _NOW_MS
    + """redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
)

_REFRESH_STREAM = (
    _NOW_MS
    + """redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
)

_ACTIVE_STREAMS = (
    _NOW_MS
    + """return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
)

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

# KEYS: usage, ss:charged:{stream}. ARGV: seconds, seed, usage ttl, batch number, its ttl. Returns the total.
_ADD_BATCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[4]) then return redis.call('GET', KEYS[1]) end
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
local total = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return total
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

    def __init__(self, url: str, timeout: float, policy: str) -> None:
        """``policy``: what the quotas do while Redis is unreachable, for the log line that says so."""
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
        self._policy = policy
        self.failures = 0  # calls that failed since start
        self.healthy = True  # whether the last call was answered
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)
        self._scripts = {
            name: self._redis.register_script(source)
            for name, source in {
                "acquire": _ACQUIRE_STREAM,
                "refresh": _REFRESH_STREAM,
                "active": _ACTIVE_STREAMS,
                "charge": _CHARGE,
                "add_batch": _ADD_BATCH,
                "used": _USED,
                "hit": _HIT,
            }.items()
        }

    async def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._run(self._scripts[name](keys=keys, args=args))

    async def _run(self, command: Awaitable[T]) -> T:
        """Await one command; count and log failures (once per outage), and the recovery."""
        try:
            result = await asyncio.wait_for(command, self._timeout * 2)
        except self._errors as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.failures += 1
            if self.healthy:
                self.healthy = False
                log.error("shared quota store unreachable (%s); policy %s", reason, self._policy)
            raise SharedStoreUnavailable(reason) from None
        if not self.healthy:
            self.healthy = True
            log.warning("shared quota store reachable again (%d failed calls so far)", self.failures)
        return result

    async def acquire_stream(self, user: str, stream_id: str, limit: int, ttl: float) -> bool:
        return bool(await self._call("acquire", [f"ss:streams:{user}"], [limit, stream_id, int(ttl * 1000)]))

    async def refresh_stream(self, user: str, stream_id: str, ttl: float) -> None:
        await self._call("refresh", [f"ss:streams:{user}"], [stream_id, int(ttl * 1000)])

    async def release_stream(self, user: str, stream_id: str) -> None:
        await self._run(self._redis.zrem(f"ss:streams:{user}", stream_id))

    async def active_streams(self, user: str) -> int:
        return int(await self._call("active", [f"ss:streams:{user}"], []))

    async def charge(self, user: str, day: str, seconds: float, limit: float | None, seed: float) -> Charge:
        accepted, added, total = await self._call(
            "charge",
            [f"ss:usage:{user}:{day}"],
            [repr(seconds), -1 if limit is None else repr(limit), repr(seed), USAGE_TTL_SECONDS],
        )
        return Charge(bool(int(accepted)), float(added), float(total))

    async def add_batch(self, user: str, day: str, seconds: float, seed: float, batch: Batch) -> float:
        stream_id, number = batch
        keys = [f"ss:usage:{user}:{day}", f"ss:charged:{stream_id}"]
        args = [repr(seconds), repr(seed), USAGE_TTL_SECONDS, number, BATCH_TTL_SECONDS]
        return float(await self._call("add_batch", keys, args))

    async def used(self, user: str, day: str, seed: float) -> float:
        return float(await self._call("used", [f"ss:usage:{user}:{day}"], [repr(seed), USAGE_TTL_SECONDS]))

    async def hit(self, bucket: str, now: float) -> int:
        window = int(now // RATE_WINDOW_SECONDS)
        return int(await self._call("hit", [f"ss:rate:{bucket}:{window}"], [RATE_WINDOW_SECONDS + 1]))

    async def close(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._redis.aclose()
