"""Session resume: a client whose socket dropped reconnects with its stream's resume token and gets the same
session back: its finals, its segment numbers, and the stream offset up to which audio is committed (the
end of the last final's audio), from which it sends its audio again.

What a token resumes lives in this process, or in Redis when a shared store is configured, so that a
client reconnecting through a load balancer to another replica resumes there. A token is unguessable
(256 random bits), only its SHA-256 is stored, it is bound to the key's user (another user's key is
refused as if the token did not exist), it is used once (resuming hands out a new token, and the old
connection, if it is still half open somewhere, can no longer write to it), and it lapses
``resume_seconds`` after its stream last changed it.

A resumed stream keeps its slot among its user's concurrent streams: a phone whose old socket is still
half open on the server (it went silent rather than closing) is let in on a one-stream tier, and the old
connection ends as soon as it is noticed: at once in the same process, at its next check (every third of
``stream_ttl_seconds``) on another replica. The same check keeps an open stream's point from lapsing
during a long silence.

Redis keys (``ss:`` prefix, like the counters):
    ss:resume:{sha256}         hash: user, slot, committed, next_segment, received, state ("open" or
                               "taken")
    ss:resume:{sha256}:finals  list: the stream's finals, oldest first
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from streamscribe.protocol import ConfigRefused, ErrorType
from streamscribe.server.counters import fail_fast_redis
from streamscribe.server.quotas import StreamLease

log = logging.getLogger(__name__)

# Unknown, lapsed, already used, or another user's: the client is told the same in every case.
REFUSED = "this resume token is unknown or has expired: start a new stream"


@dataclass
class ResumePoint:
    """What a resumed stream continues from (offsets are seconds of the whole stream, across connections).

    Attributes:
        user_id: The user whose key opened the stream.
        slot: The stream's slot among the user's concurrent streams (``StreamLease.slot``).
        finals: The stream's finals so far, oldest first.
        committed_seconds: The end of the last final's audio; the client resends audio from here.
        next_segment: The ``segment_id`` the next utterance gets.
        received_seconds: How far audio was received (and charged); what is resent up to here is free.
    """

    user_id: str
    slot: str = field(default_factory=lambda: secrets.token_hex(16))
    finals: list[str] = field(default_factory=list)
    committed_seconds: float = 0.0
    next_segment: int = 0
    received_seconds: float = 0.0


class ResumeStore(Protocol):
    """Where resume points live: this process, or Redis (shared by replicas). Keys are token hashes."""

    async def open(self, key: str, point: ResumePoint, ttl: float) -> None:
        """Start ``key`` at ``point`` (a new stream's, or one taken from a resumed token)."""
        ...

    async def take(self, key: str, user_id: str) -> ResumePoint | None:
        """The point under ``key`` if it is open and ``user_id``'s, marking it taken; else None."""
        ...

    async def add_final(self, key: str, text: str, point: ResumePoint, ttl: float) -> None:
        """Append a final and note the point's offsets, unless ``key`` was taken or lapsed."""
        ...

    async def note(self, key: str, point: ResumePoint, ttl: float, clear_finals: bool = False) -> bool:
        """Note the point's offsets (and forget its finals: a reset), unless ``key`` was taken or lapsed;
        False when it was taken (resumed)."""
        ...

    async def forget(self, key: str) -> None: ...

    async def close(self) -> None: ...


@dataclass
class _LocalEntry:
    point: ResumePoint
    expires_at: float
    taken: bool = False


class LocalResumeStore:
    """Resume points in this process (one replica)."""

    def __init__(self) -> None:
        self._entries: dict[str, _LocalEntry] = {}

    def _live(self, key: str) -> _LocalEntry | None:
        now = time.monotonic()
        for lapsed in [k for k, entry in self._entries.items() if entry.expires_at <= now]:
            del self._entries[lapsed]
        entry = self._entries.get(key)
        return entry if entry is not None and not entry.taken else None

    async def open(self, key: str, point: ResumePoint, ttl: float) -> None:
        self._entries[key] = _LocalEntry(_copy(point), time.monotonic() + ttl)

    async def take(self, key: str, user_id: str) -> ResumePoint | None:
        entry = self._live(key)
        if entry is None or entry.point.user_id != user_id:
            return None
        entry.taken = True
        return _copy(entry.point)

    async def add_final(self, key: str, text: str, point: ResumePoint, ttl: float) -> None:
        entry = self._live(key)
        if entry is not None:
            entry.point.finals.append(text)
            _note_offsets(entry.point, point)
            entry.expires_at = time.monotonic() + ttl

    async def note(self, key: str, point: ResumePoint, ttl: float, clear_finals: bool = False) -> bool:
        entry = self._live(key)
        if entry is not None:
            if clear_finals:
                entry.point.finals.clear()
            _note_offsets(entry.point, point)
            entry.expires_at = time.monotonic() + ttl
        taken = self._entries.get(key)
        return not (taken is not None and taken.taken)

    async def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    async def close(self) -> None:
        self._entries.clear()


def _copy(point: ResumePoint) -> ResumePoint:
    return ResumePoint(
        point.user_id,
        point.slot,
        list(point.finals),
        point.committed_seconds,
        point.next_segment,
        point.received_seconds,
    )


def _note_offsets(kept: ResumePoint, point: ResumePoint) -> None:
    kept.committed_seconds = point.committed_seconds
    kept.next_segment = point.next_segment
    kept.received_seconds = point.received_seconds


# KEYS: the hash, its finals. ARGV: user. Returns the hash's fields (flat) and the finals, or nil.
_TAKE = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return nil end
local point = {}
for i = 1, #fields, 2 do point[fields[i]] = fields[i + 1] end
if point['state'] ~= 'open' or point['user'] ~= ARGV[1] then return nil end
redis.call('HSET', KEYS[1], 'state', 'taken')
return {fields, redis.call('LRANGE', KEYS[2], 0, -1)}
"""
# KEYS: the hash, its finals. ARGV: ttl ms, committed, next_segment, received, clear finals (0/1), a final
# to append (optional). Returns 1 (noted), 0 (taken: resumed) or 2 (lapsed).
_NOTE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'taken' then return 0 end
if state ~= 'open' then return 2 end
redis.call('HSET', KEYS[1], 'committed', ARGV[2], 'next_segment', ARGV[3], 'received', ARGV[4])
if ARGV[5] == '1' then redis.call('DEL', KEYS[2]) end
if ARGV[6] then redis.call('RPUSH', KEYS[2], ARGV[6]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[1]) end
return 1
"""
# KEYS: the hash, its finals. ARGV: ttl ms, user, slot, committed, next_segment, received, finals...
_OPEN = """
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'state', 'open', 'user', ARGV[2], 'slot', ARGV[3], 'committed', ARGV[4],
  'next_segment', ARGV[5], 'received', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if #ARGV > 6 then
  redis.call('RPUSH', KEYS[2], unpack(ARGV, 7))
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 1
"""


class RedisResumeStore:
    """Resume points in Redis, shared by every replica that points at it; each change is one script."""

    def __init__(self, url: str, timeout: float) -> None:
        import redis.asyncio as redis

        self._redis = fail_fast_redis(url, timeout)
        self._timeout = timeout
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)
        self._take = self._redis.register_script(_TAKE)
        self._note = self._redis.register_script(_NOTE)
        self._open = self._redis.register_script(_OPEN)

    @staticmethod
    def _keys(key: str) -> list[str]:
        return [f"ss:resume:{key}", f"ss:resume:{key}:finals"]

    async def _run(self, script: Any, key: str, args: list[Any]) -> Any:
        return await asyncio.wait_for(script(keys=self._keys(key), args=args), self._timeout * 2)

    async def open(self, key: str, point: ResumePoint, ttl: float) -> None:
        offsets = [point.committed_seconds, point.next_segment, point.received_seconds]
        await self._run(
            self._open, key, [int(ttl * 1000), point.user_id, point.slot, *offsets, *point.finals]
        )

    async def take(self, key: str, user_id: str) -> ResumePoint | None:
        found = await self._run(self._take, key, [user_id])
        if not found:
            return None
        flat, finals = found
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        return ResumePoint(
            user_id,
            fields.get("slot") or secrets.token_hex(16),  # a point saved before slots were kept
            list(finals),
            float(fields["committed"]),
            int(fields["next_segment"]),
            float(fields["received"]),
        )

    async def add_final(self, key: str, text: str, point: ResumePoint, ttl: float) -> None:
        await self._run(self._note, key, [*self._note_args(point, ttl), 0, text])

    async def note(self, key: str, point: ResumePoint, ttl: float, clear_finals: bool = False) -> bool:
        return bool(await self._run(self._note, key, [*self._note_args(point, ttl), int(clear_finals)]))

    @staticmethod
    def _note_args(point: ResumePoint, ttl: float) -> list[Any]:
        return [int(ttl * 1000), point.committed_seconds, point.next_segment, point.received_seconds]

    async def forget(self, key: str) -> None:
        await asyncio.wait_for(self._redis.delete(*self._keys(key)), self._timeout * 2)

    async def close(self) -> None:
        await self._redis.aclose()


class ResumableStream:
    """One connection's hold on its stream's resume point: what it continues from (all zero for a new
    stream), its token for the client, and the changes it writes as finals come.

    The session underneath counts its own clock and segments from zero; ``base_seconds`` and
    ``base_segment`` turn them into the whole stream's, and audio the client sends again (up to
    ``received_seconds``) is not charged twice.
    """

    def __init__(
        self, store: ResumeStore, ttl: float, token: str, point: ResumePoint, ended: Callable[[], None]
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._ended = ended
        self.token = token
        self.point = point
        self.superseded = asyncio.Event()  # set when the stream is resumed on another connection here
        self.base_seconds = point.committed_seconds
        self.base_segment = point.next_segment
        self._charged_until = point.received_seconds  # whole-stream seconds
        self._received = point.committed_seconds  # whole-stream seconds received on this connection
        self._finished = False
        self._saved_received = point.received_seconds  # received_seconds as the store last had it

    @property
    def earlier_finals(self) -> list[str]:
        return list(self.point.finals)

    @property
    def slot(self) -> str:
        return self.point.slot

    def received(self, seconds: float) -> float:
        """Note ``seconds`` more of audio; returns how many of them to charge (resent audio is free)."""
        start = self._received
        self._received += seconds
        free = max(0.0, min(self._received, self._charged_until) - start)
        self._charged_until = max(self._charged_until, self._received)
        self.point.received_seconds = self._charged_until
        return seconds - free

    async def opened(self) -> None:
        if await self._write(self._store.open(_hash(self.token), self.point, self._ttl)):
            self._saved_received = self.point.received_seconds

    async def final(self, text: str, segment: int, end: float) -> None:
        """A final of the whole stream's ``segment`` ending at ``end`` (whole-stream seconds) was made."""
        self.point.committed_seconds = end
        self.point.next_segment = segment + 1
        received = self.point.received_seconds
        if await self._write(self._store.add_final(_hash(self.token), text, self.point, self._ttl)):
            self._saved_received = received

    async def reset(self) -> None:
        """The client reset the stream: its finals are gone, and what was received is committed."""
        self.point.committed_seconds = self._received
        await self._write(self._store.note(_hash(self.token), self.point, self._ttl, clear_finals=True))

    async def still_here(self) -> bool:
        """Note the point again, so that it does not lapse while the stream is open (silent or not); False
        when the stream was resumed on another connection. True when the store does not answer."""
        if self.superseded.is_set():
            return False
        received = self.point.received_seconds
        try:
            noted = await self._store.note(_hash(self.token), self.point, self._ttl)
        except Exception as exc:  # as in _write
            log.warning("resume point not saved: %s", type(exc).__name__, extra={"event": "resume_unsaved"})
            return True
        if noted:
            self._saved_received = received
        return noted

    async def dropped(self, lease: StreamLease) -> None:
        """The connection ended: unless the client stopped the stream, keep its point ``ttl`` from now, with
        what was received. When the stream was resumed before this connection saw its end, the resumed
        one holds the stream's slot now, and charges what it is sent after the point last saved here: that
        is given back."""
        self._ended()
        if self._finished:
            return
        try:
            noted = await self._store.note(_hash(self.token), self.point, self._ttl)
        except Exception as exc:  # as in _write
            log.warning("resume point not saved: %s", type(exc).__name__, extra={"event": "resume_unsaved"})
            return
        if not noted:
            lease.hand_over()
            await lease.give_back(self._charged_until - self._saved_received)

    async def finished(self) -> None:
        """The client stopped the stream (or it was refused): there is nothing to resume."""
        self._finished = True
        self._ended()
        await self._write(self._store.forget(_hash(self.token)))

    async def _write(self, change: Any) -> bool:
        """Await a change of the store; False when it failed. The stream goes on when the store does not
        answer: only its resume is at stake."""
        try:
            await change
        except Exception as exc:  # Redis down or slow: logged, never the stream's end
            log.warning("resume point not saved: %s", type(exc).__name__, extra={"event": "resume_unsaved"})
            return False
        return True


class Resumes:
    """Hands out resume tokens and takes them back (see the module docstring)."""

    def __init__(self, store: ResumeStore, ttl: float) -> None:
        self._store = store
        self._ttl = ttl
        self._open: dict[str, ResumableStream] = {}  # token hash -> the stream open on it in this process

    @classmethod
    def for_settings(cls, redis_url: str | None, timeout: float, ttl: float) -> Resumes:
        return cls(RedisResumeStore(redis_url, timeout) if redis_url else LocalResumeStore(), ttl)

    async def start(self, user_id: str, token: str | None) -> ResumableStream:
        """The stream for a new connection: a new one, or the one ``token`` resumes (ConfigRefused when it
        is unknown, lapsed, used, or another user's). Either way it gets a new token."""
        point = ResumePoint(user_id)
        if token is not None:
            try:
                taken = await self._store.take(_hash(token), user_id)
            except Exception as exc:  # the shared store is down: the stream cannot be found
                log.warning("resume failed: %s", type(exc).__name__, extra={"event": "resume_failed"})
                taken = None
            if taken is None:
                raise ConfigRefused(ErrorType.BAD_REQUEST, REFUSED)
            point = taken
            left = self._open.pop(_hash(token), None)
            if left is not None:  # its socket is still open here (half open, most likely): it ends now
                left.superseded.set()
            log.info(
                "stream resumed",
                extra={
                    "event": "stream_resumed",
                    "segments": point.next_segment,
                    "at": point.committed_seconds,
                },
            )
        token = secrets.token_urlsafe(32)
        key = _hash(token)
        stream = ResumableStream(self._store, self._ttl, token, point, functools.partial(self._ended, key))
        self._open[key] = stream
        await stream.opened()
        return stream

    def _ended(self, key: str) -> None:
        self._open.pop(key, None)

    async def close(self) -> None:
        await self._store.close()


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
