"""What every live-stream protocol shares, from accept to close: the origin check, admission (key, rate
limits, a stream slot from the quotas), the engine slot, the session, the watchers (shutdown drain, key
lapse), pacing, sending and closing. The seed protocol (``server/stream.py``) and OpenAI's Realtime API
(``server/realtime.py``) are subclasses: each reads its own messages and writes its own frames, so both
run on the same sessions, engines, keys and quotas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from streamscribe.engines.base import Engine
from streamscribe.protocol import CloseCode, ErrorType, StreamError
from streamscribe.server.auth import Principal
from streamscribe.server.logs import new_request_id
from streamscribe.server.origins import origin_allowed
from streamscribe.server.pacing import StreamPacing
from streamscribe.server.quotas import StreamLease
from streamscribe.server.runtime import Runtime
from streamscribe.streaming.session import LiveSession, SessionEvent, SessionOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

# A stream whose key is revoked or expires gets the final of its open utterance if it takes no longer.
LAPSED_KEY_FINAL_SECONDS = 5.0


class SessionEnded(Exception):
    """The socket is closed (by us or the peer); stop handling it."""


class WireFrame(Protocol):
    """A frame of either protocol: it knows its own JSON."""

    def to_json(self) -> str: ...


class LiveStreamConnection:
    """One client's WebSocket, from accept to close; a protocol implements ``_stream``, ``_receive_text``,
    ``_error_frame`` and ``_wrap_up``."""

    def __init__(self, websocket: WebSocket, runtime: Runtime) -> None:
        self._ws = websocket
        self._runtime = runtime
        self._send_lock = asyncio.Lock()
        self._ended = asyncio.Event()  # the socket is closed, by us or the peer
        self._ending = False  # shutting down or the key lapsed: audio from now on is not transcribed
        self._pacing = StreamPacing(runtime.settings.streaming)
        self._paced = False  # whether the stream has been read more slowly (logged once)
        # (seconds of stream audio received, monotonic time then): for the emission-delay metric.
        self._received_at: deque[tuple[float, float]] = deque(maxlen=2000)
        self._session: LiveSession | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._admitted = False
        self._lease: StreamLease | None = None

    async def _stream(self, principal: Principal) -> None:
        """The protocol's part, once the key is granted: configure, take a stream slot (``_open_lease``),
        then serve."""
        raise NotImplementedError

    async def _receive_text(self) -> str:
        """The next text frame (counted for pacing); raises SessionEnded when the peer has gone."""
        raise NotImplementedError

    def _error_frame(self, error: StreamError) -> WireFrame:
        """How the protocol tells a client about ``error``."""
        raise NotImplementedError

    async def _wrap_up(self, session: LiveSession) -> None:
        """On shutdown, once the open utterance has ended: finish the session, the protocol's way."""
        raise NotImplementedError

    async def _session_closed(self, lease: StreamLease) -> None:
        """After the session closed, before the lease does: what the protocol still holds for the stream."""

    async def _finish(self, session: LiveSession) -> None:
        """End the open utterance and emit the finals still owed (a protocol may report more)."""
        await session.flush()

    async def run(self) -> None:
        new_request_id("ws")
        if not origin_allowed(self._ws, self._runtime.settings.allowed_origins):
            # Refused before the upgrade (HTTP 403): a page from another site gets no socket at all.
            log.warning(
                "WebSocket from a foreign origin refused",
                extra={"event": "origin_refused", "origin": self._ws.headers.get("origin")},
            )
            self._runtime.metrics.errors.labels("origin_refused").inc()
            await self._ws.close(code=int(CloseCode.POLICY_VIOLATION))
            return
        if self._runtime.draining.is_set():
            await self._ws.close(code=int(CloseCode.GOING_AWAY))
            return
        await self._ws.accept()
        started = time.monotonic()
        self._runtime.stream_opened()
        try:
            principal = await self._runtime.access.admit(self._ws, self._receive_text)
            await self._stream(principal)
        except StreamError as error:
            await self._fail(error)
        except (SessionEnded, WebSocketDisconnect):
            pass
        except Exception:
            log.exception("unexpected error in stream")
            await self._fail(StreamError(ErrorType.INTERNAL_ERROR, "internal server error"))
        finally:
            for watcher in self._watchers:
                watcher.cancel()
            await asyncio.gather(*self._watchers, return_exceptions=True)
            session = self._session
            if session is not None:
                await session.close()
            if self._lease is not None:
                await self._session_closed(self._lease)
                await self._lease.close()
            if self._admitted:
                self._runtime.release()
            self._runtime.stream_closed()
            log.info(
                "stream ended",
                extra={
                    "event": "stream_end",
                    "audio_seconds": round(session.received_seconds, 2) if session else 0.0,
                    "duration_seconds": round(time.monotonic() - started, 2),
                },
            )

    def _log_start(self, engine: Engine, language: str | None, task: str, protocol: str) -> None:
        log.info(
            "stream started",
            extra={
                "event": "stream_start",
                "engine": engine.name,
                "language": language,
                "task": task,
                "protocol": protocol,
            },
        )

    async def _open_lease(self, principal: Principal, slot: str | None = None) -> StreamLease:
        """The stream's slot among its user's concurrent streams, and its minutes (``slot``: a resumed
        stream's own); closed with the socket."""
        self._lease = await self._runtime.access.quotas.open_stream(principal.user_id, principal.limits, slot)
        self._runtime.metrics.streams.inc()
        return self._lease

    def _admit(self, engine: Engine) -> None:
        """Take a server stream slot on ``engine`` (``Runtime.admit``), given back when the socket closes."""
        self._runtime.admit(engine)
        self._admitted = True

    def _start_session(
        self,
        engine: Engine,
        options: SessionOptions,
        emit: Callable[[SessionEvent], Awaitable[None]],
        principal: Principal,
        lease: StreamLease,
    ) -> LiveSession:
        """The stream's live session, with its watchers: shutdown drain and key lapse."""
        session = self._session = self._runtime.new_session(engine, options, emit)
        self._watchers = [
            asyncio.create_task(self._finish_on_shutdown(session)),
            asyncio.create_task(self._end_when_key_lapses(principal, session, lease.heartbeat_seconds)),
        ]
        return session

    async def _finish_on_shutdown(self, session: LiveSession) -> None:
        """On server shutdown: let the current utterance end (up to half the grace time), then wrap up the
        session (its final, and what the protocol sends at the end) and close with 1001; the other half is
        for decoding it."""
        await self._runtime.draining.wait()
        deadline = time.monotonic() + self._runtime.settings.shutdown_grace_seconds / 2
        while session.in_utterance and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._ending = True
        with contextlib.suppress(SessionEnded):
            await self._wrap_up(session)
        await self._close(CloseCode.GOING_AWAY)

    async def _end_when_key_lapses(self, principal: Principal, session: LiveSession, every: float) -> None:
        """Re-check the key as often as the lease refreshes its slot, and when it expires. Once it is
        revoked or expired: the open utterance's final (if it comes within LAPSED_KEY_FINAL_SECONDS),
        then auth_failed and close 4401."""
        authenticator = self._runtime.access.authenticator
        while True:
            delay = every
            if principal.expires_at is not None:
                delay = min(delay, max(0.0, principal.expires_at - time.time()))
            await asyncio.sleep(delay)
            if not await authenticator.still_usable(principal):
                break
        self._ending = True
        log.info("the stream's key was revoked or expired", extra={"event": "key_lapsed"})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LAPSED_KEY_FINAL_SECONDS):
                await self._finish(session)
        await self._fail(StreamError(ErrorType.AUTH_FAILED, "this API key was revoked or has expired"))

    async def _receive_unless_draining(self) -> str:
        """The next text frame; if the server starts shutting down first, close with 1001 instead."""
        receive = asyncio.ensure_future(self._receive_text())
        draining = asyncio.ensure_future(self._runtime.draining.wait())
        try:
            await asyncio.wait({receive, draining}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            draining.cancel()
            if not receive.done():  # shutting down, or the config timeout fired
                receive.cancel()
                await asyncio.gather(receive, return_exceptions=True)
        if not receive.cancelled():
            return receive.result()
        await self._close(CloseCode.GOING_AWAY)
        raise SessionEnded

    async def _within_idle_timeout(self, receive: Awaitable[T]) -> T:
        """The next frame (``receive``), or StreamError(timeout) when none comes within the idle timeout."""
        idle_timeout = self._runtime.settings.access.idle_timeout_seconds
        try:
            async with asyncio.timeout(idle_timeout):
                return await receive
        except TimeoutError:
            raise StreamError(ErrorType.TIMEOUT, f"no message for {idle_timeout:g} s: closing") from None

    async def _pace(self) -> None:
        """Wait until the stream is back within its budget before reading on (see server/pacing.py), or
        until the socket closes."""
        delay = self._pacing.wait()
        if delay <= 0:
            return
        if not self._paced:
            self._paced = True
            log.info(
                "stream sends faster than its budget: reading it more slowly",
                extra={"event": "stream_paced"},
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), delay)

    async def _send(self, frame: WireFrame) -> None:
        if self._ended.is_set():
            raise SessionEnded
        async with self._send_lock:
            try:
                await self._ws.send_text(frame.to_json())
            except (WebSocketDisconnect, RuntimeError):
                self._ended.set()
                raise SessionEnded from None

    def _received_audio(self, session: LiveSession, seconds: float) -> None:
        """Count ``seconds`` of audio just fed to ``session`` (metrics, emission delays)."""
        self._runtime.metrics.audio_seconds.labels("stream").inc(seconds)
        self._received_at.append((session.received_seconds, time.monotonic()))

    def _observe_emission(self, kind: str, end: float) -> None:
        """Delay from receiving the audio at ``end`` (stream seconds) to now."""
        received = next((at for seconds, at in self._received_at if seconds >= end - 1e-3), None)
        if received is not None:
            self._runtime.metrics.emission_delay.labels(kind).observe(time.monotonic() - received)

    def _count_error(self, error: StreamError) -> None:
        self._runtime.metrics.errors.labels(error.error_type.value).inc()

    async def _fail(self, error: StreamError) -> None:
        self._count_error(error)
        if error.error_type is ErrorType.QUOTA_EXCEEDED:
            self._runtime.metrics.quota_rejections.labels(error.quota or "unknown").inc()
        log.info(
            "stream error: %s",
            error.message,
            extra={"event": "stream_error", "error_type": error.error_type.value},
        )
        with contextlib.suppress(SessionEnded):
            await self._send(self._error_frame(error))
        await self._close(error.close_code or CloseCode.ENGINE_FAILURE)

    async def _close(self, code: CloseCode) -> None:
        if self._ended.is_set() or self._ws.client_state != WebSocketState.CONNECTED:
            return
        self._ended.set()
        async with self._send_lock:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self._ws.close(code=int(code))
