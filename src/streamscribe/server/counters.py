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
# The day's usage to start a missing counter from, read when it is found missing (not when a stream opened:
# by then the database and the other streams may have moved on).
Seed = Callable[[], Awaitable[float]]
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
        """Take a stream slot unless ``limit`` are taken; a slot already held (a resumed stream's, still
        held by the connection it left) is its own again, whatever the limit."""
        ...

    async def refresh_stream(self, user: str, stream_id: str, ttl: float) -> None: ...

    async def release_stream(self, user: str, stream_id: str) -> None: ...

    async def active_streams(self, user: str) -> int: ...

    async def charge(self, user: str, day: str, seconds: float, limit: float | None, seed: Seed) -> Charge:
        """Add ``seconds`` to the day's usage. When that would pass ``limit`` the frame is refused and the
        usage set to the limit: what was left cannot be used by a frame that does not fit, and the next
        stream is refused at once. ``seed`` is called when the counter does not exist (a new day, a new
        process, a Redis that lost its data) and gives what it starts from."""
        ...

    async def used(self, user: str, day: str, seed: Seed) -> float:
        """The day's usage; ``seed`` as for ``charge``."""
        ...

    async def charge_if_fits(
        self, user: str, day: str, seconds: float, limit: float | None, seed: Seed
    ) -> Charge:
        """Add ``seconds`` only when the day's usage stays within ``limit``; else change nothing."""
        ...

    async def refund(self, user: str, day: str, seconds: float, seed: Seed) -> float:
        """Take back ``seconds`` charged earlier (never below zero); the day's new total."""
        ...

    async def add_batch(self, user: str, day: str, seconds: float, seed: Seed, batch: Batch) -> float:
        """Add a stream's ``batch`` of seconds to the day's usage, whatever the limit; the day's total. A
        batch is added once: sent again (its first answer was lost), it only returns the total."""
        ...

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
        if stream_id not in streams and len(streams) >= limit:
            return False
        streams[stream_id] = self._clock() + ttl
        return True

    async def refresh_stream(self, user: str, stream_id: str, ttl: float) -> None:
        self._streams[user][stream_id] = self._clock() + ttl

    async def release_stream(self, user: str, stream_id: str) -> None:
        self._streams[user].pop(stream_id, None)

    async def active_streams(self, user: str) -> int:
        return len(self._live(user))

    async def _counter(self, user: str, day: str, seed: Seed) -> float:
        if (user, day) not in self._usage:
            seeded = await seed()
            return self._usage.setdefault((user, day), seeded)  # another call may have seeded meanwhile
        return self._usage[(user, day)]

    async def charge(self, user: str, day: str, seconds: float, limit: float | None, seed: Seed) -> Charge:
        used = await self._counter(user, day, seed)
        if limit is not None and used + seconds > limit:
            self._usage[(user, day)] = max(used, limit)
            return Charge(False, max(0.0, limit - used), max(used, limit))
        self._usage[(user, day)] = used + seconds
        return Charge(True, seconds, used + seconds)

    async def used(self, user: str, day: str, seed: Seed) -> float:
        return await self._counter(user, day, seed)

    async def charge_if_fits(
        self, user: str, day: str, seconds: float, limit: float | None, seed: Seed
    ) -> Charge:
        return await self._adjust(user, day, seconds, limit, seed)

    async def refund(self, user: str, day: str, seconds: float, seed: Seed) -> float:
        return (await self._adjust(user, day, -seconds, None, seed)).total

    async def _adjust(self, user: str, day: str, seconds: float, limit: float | None, seed: Seed) -> Charge:
        used = await self._counter(user, day, seed)
        if seconds > 0 and limit is not None and used + seconds > limit:
            return Charge(False, 0.0, used)
        total = max(0.0, used + seconds)
        self._usage[(user, day)] = total
        return Charge(True, total - used, total)

    async def add_batch(self, user: str, day: str, seconds: float, seed: Seed, batch: Batch) -> float:
        # A call in this process never loses its answer, so no batch comes twice.
        return (await self.charge(user, day, seconds, None, seed)).total

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
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
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

# A counter that does not exist is started from the seed, or, when the seed is '', left missing and the
# script answers MISSING: the caller then reads a fresh seed and runs it again with that.
MISSING = "missing"


def _seeded_counter(seed: int, ttl: int) -> str:
    """Lua that starts a missing counter KEYS[1] from ARGV[seed] (to live ARGV[ttl] s), or, when that
    seed is '', answers MISSING."""
    return f"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[{seed}] == '' then return '{MISSING}' end
  redis.call('SET', KEYS[1], ARGV[{seed}], 'EX', ARGV[{ttl}])
end"""


# ARGV: seconds, limit (negative: none), ttl, seed. Returns {accepted, added, total} (numbers as strings:
# Lua numbers would reach Python as integers), or MISSING.
_CHARGE = (
    _seeded_counter(seed=4, ttl=3)
    + """
local used = tonumber(redis.call('GET', KEYS[1]))
local limit = tonumber(ARGV[2])
if limit >= 0 and used + tonumber(ARGV[1]) > limit then
  if used >= limit then return {0, '0', tostring(used)} end
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return {0, tostring(limit - used), ARGV[2]}
end
local total = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, ARGV[1], total}
"""
)

# charge_if_fits (seconds > 0) and refund (seconds < 0, never below zero). ARGV as for _CHARGE. Returns
# {accepted, added, total} like _CHARGE, but a charge that does not fit changes nothing; or MISSING.
_ADJUST = (
    _seeded_counter(seed=4, ttl=3)
    + """
local used = tonumber(redis.call('GET', KEYS[1]))
local seconds = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if seconds > 0 and limit >= 0 and used + seconds > limit then return {0, '0', tostring(used)} end
local total = math.max(0, used + seconds)
redis.call('SET', KEYS[1], tostring(total), 'EX', ARGV[3])
return {1, tostring(total - used), tostring(total)}
"""
)

# KEYS: usage, ss:charged:{stream}. ARGV: seconds, usage ttl, batch number, its ttl, seed. Returns the
# total, or MISSING.
_ADD_BATCH = (
    _seeded_counter(seed=5, ttl=2)
    + """
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[3]) then return redis.call('GET', KEYS[1]) end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
local total = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return total
"""
)

# ARGV: ttl, seed. Returns the usage, or MISSING.
_USED = (
    _seeded_counter(seed=2, ttl=1)
    + """
return redis.call('GET', KEYS[1])
"""
)

_HIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""


def fail_fast_redis(url: str, timeout: float) -> Any:
    """An asyncio Redis client without retries: a dead Redis must be noticed within ``timeout``, not after
    seconds of backoff. (Imported here: Redis is only needed with a shared store.)"""
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


class RedisCounters:
    """Counters in Redis, shared by every replica that points at it."""

    def __init__(self, url: str, timeout: float, policy: str) -> None:
        """``policy``: what the quotas do while Redis is unreachable, for the log line that says so."""
        import redis.asyncio as redis

        self._redis = fail_fast_redis(url, timeout)
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
                "adjust": _ADJUST,
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

    async def _seeded(self, name: str, keys: str | list[str], args: list[Any], seed: Seed) -> Any:
        """Run a usage script; when it finds the counter missing, again with a seed read just now."""
        keys = [keys] if isinstance(keys, str) else keys
        result = await self._call(name, keys, [*args, ""])
        if result == MISSING:
            result = await self._call(name, keys, [*args, repr(await seed())])
        return result

    async def charge(self, user: str, day: str, seconds: float, limit: float | None, seed: Seed) -> Charge:
        return await self._add_usage("charge", user, day, seconds, limit, seed)

    async def used(self, user: str, day: str, seed: Seed) -> float:
        return float(await self._seeded("used", f"ss:usage:{user}:{day}", [USAGE_TTL_SECONDS], seed))

    async def charge_if_fits(
        self, user: str, day: str, seconds: float, limit: float | None, seed: Seed
    ) -> Charge:
        return await self._add_usage("adjust", user, day, seconds, limit, seed)

    async def refund(self, user: str, day: str, seconds: float, seed: Seed) -> float:
        return (await self._add_usage("adjust", user, day, -seconds, None, seed)).total

    async def _add_usage(
        self, script: str, user: str, day: str, seconds: float, limit: float | None, seed: Seed
    ) -> Charge:
        accepted, added, total = await self._seeded(
            script,
            f"ss:usage:{user}:{day}",
            [repr(seconds), -1 if limit is None else repr(limit), USAGE_TTL_SECONDS],
            seed,
        )
        return Charge(bool(int(accepted)), float(added), float(total))

    async def add_batch(self, user: str, day: str, seconds: float, seed: Seed, batch: Batch) -> float:
        stream_id, number = batch
        keys = [f"ss:usage:{user}:{day}", f"ss:charged:{stream_id}"]
        args = [repr(seconds), USAGE_TTL_SECONDS, number, BATCH_TTL_SECONDS]
        return float(await self._seeded("add_batch", keys, args, seed))

    async def hit(self, bucket: str, now: float) -> int:
        window = int(now // RATE_WINDOW_SECONDS)
        return int(await self._call("hit", [f"ss:rate:{bucket}:{window}"], [RATE_WINDOW_SECONDS + 1]))

    async def close(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._redis.aclose()
