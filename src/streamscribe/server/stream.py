"""The streaming WebSocket: authenticate, configure, then turn audio frames into transcript frames."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from streamscribe.audio import AudioInput, DecodedAudio
from streamscribe.engines.base import Engine, EngineUnavailable, UnsupportedLanguage
from streamscribe.engines.registry import UnknownModel, resolve_model
from streamscribe.protocol import (
    AudioMessage,
    CloseCode,
    CommitMessage,
    ConfigMessage,
    ConfigRefused,
    ErrorType,
    FullTranscriptFrame,
    PingMessage,
    PongFrame,
    ResetMessage,
    ServerFrame,
    StatusFrame,
    StopMessage,
    StreamError,
    TranscriptFrame,
    WarningFrame,
    WordTiming,
    parse_client_message,
)
from streamscribe.server.auth import Principal
from streamscribe.server.logs import new_request_id
from streamscribe.server.origins import origin_allowed
from streamscribe.server.pacing import StreamPacing
from streamscribe.server.quotas import StreamLease
from streamscribe.server.resume import ResumableStream
from streamscribe.server.runtime import Runtime
from streamscribe.streaming.diarization import StreamSpeakers, turn_vad
from streamscribe.streaming.session import (
    EngineFailure,
    FinalText,
    LiveSession,
    SessionEvent,
    SessionOptions,
)

log = logging.getLogger(__name__)

# A stream whose key is revoked or expires gets the final of its open utterance if it takes no longer.
LAPSED_KEY_FINAL_SECONDS = 5.0


class _SessionEnded(Exception):
    """The socket is closed (by us or the peer); stop handling it."""


class StreamConnection:
    """One client's WebSocket, from accept to close."""

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
        session: LiveSession | None = None
        watchers: list[asyncio.Task[None]] = []
        lease: StreamLease | None = None
        audio_input: AudioInput | None = None
        resume: ResumableStream | None = None
        admitted = False
        started = time.monotonic()
        self._runtime.stream_opened()
        try:
            access = self._runtime.access
            principal = await access.admit(self._ws, self._receive_text)
            lease = await access.quotas.open_stream(principal.user_id, principal.limits)
            self._runtime.metrics.streams.inc()
            config = await self._receive_config()
            resume = await self._runtime.resumes.start(principal.user_id, config.resume)
            engine, audio_input = await self._start(config)
            diarizer = await self._runtime.diarizer() if config.diarization else None
            self._runtime.admit(engine)
            admitted = True
            await self._send(
                StatusFrame(
                    state="ready",
                    model=engine.name,
                    resume_token=resume.token,
                    resume_from=round(resume.base_seconds, 3),
                )
            )
            log.info(
                "stream started",
                extra={
                    "event": "stream_start",
                    "engine": engine.name,
                    "language": config.language,
                    "task": config.task,
                },
            )
            session = self._new_session(config, engine, resume)
            if diarizer is not None:
                session.label_speakers(StreamSpeakers(diarizer))
            watchers = [
                asyncio.create_task(self._finish_on_shutdown(session)),
                asyncio.create_task(self._end_when_key_lapses(principal, session, lease.heartbeat_seconds)),
            ]
            await self._serve(session, audio_input, lease, resume)
        except StreamError as error:
            await self._fail(error)
        except (_SessionEnded, WebSocketDisconnect):
            pass
        except Exception:
            log.exception("unexpected error in stream")
            await self._fail(StreamError(ErrorType.INTERNAL_ERROR, "internal server error"))
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            if session is not None:
                await session.close()
            if audio_input is not None:
                audio_input.close()
            if resume is not None and lease is not None:
                await resume.dropped(lease)  # unless the client stopped it: then there is nothing to resume
            if lease is not None:
                await lease.close()
            if admitted:
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

    async def _finish_on_shutdown(self, session: LiveSession) -> None:
        """On server shutdown: let the current utterance end (up to half the grace time), then send its
        final and the full transcript and close with 1001; the other half is for decoding it."""
        await self._runtime.draining.wait()
        deadline = time.monotonic() + self._runtime.settings.shutdown_grace_seconds / 2
        while session.in_utterance and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._ending = True
        with contextlib.suppress(_SessionEnded):
            await self._send(FullTranscriptFrame(text=await session.flush()))
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
                await session.flush()
        await self._fail(StreamError(ErrorType.AUTH_FAILED, "this API key was revoked or has expired"))

    async def _receive_config(self) -> ConfigMessage:
        timeout = self._runtime.settings.streaming.config_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                message = parse_client_message(await self._receive_unless_draining())
                while isinstance(message, PingMessage):
                    await self._send(PongFrame())
                    await self._pace()
                    message = parse_client_message(await self._receive_unless_draining())
        except TimeoutError:
            raise ConfigRefused(ErrorType.TIMEOUT, f"no config message within {timeout:g} s") from None
        except StreamError as error:
            raise ConfigRefused(error.error_type, f"invalid config: {error.message}") from None
        if not isinstance(message, ConfigMessage):
            raise ConfigRefused(
                ErrorType.BAD_REQUEST, f"the first message must be a config, got {message.type!r}"
            )
        return message

    async def _start(self, config: ConfigMessage) -> tuple[Engine, AudioInput]:
        """The engine for the config (a fallback announced with a warning frame) and the stream's audio
        input, which decodes the config's format and resamples it to the engine's rate."""
        try:
            model, variant = resolve_model(
                config.model or self._runtime.settings.default_model, config.variant
            )
            await self._send(
                StatusFrame(state="configured", model=model, variant=variant, language=config.language)
            )
            choice = await self._runtime.choose_engine(model, variant, config.language, config.task)
        except (UnknownModel, UnsupportedLanguage) as exc:
            raise ConfigRefused(ErrorType.BAD_REQUEST, f"invalid config: {exc}") from None
        except EngineUnavailable as exc:
            raise StreamError(ErrorType.MODEL_UNAVAILABLE, str(exc)) from None
        engine = choice.engine
        if choice.fallback_reason is not None:
            await self._send(
                WarningFrame(
                    fallback=True,
                    original_model=f"{model}-{variant}",
                    active_model=engine.name,
                    message=choice.fallback_reason,
                )
            )
        max_bytes = self._runtime.settings.streaming.max_frame_bytes
        return engine, AudioInput(config.audio_format, config.sample_rate, engine.sample_rate, max_bytes)

    def _new_session(self, config: ConfigMessage, engine: Engine, resume: ResumableStream) -> LiveSession:
        settings = self._runtime.settings
        options = SessionOptions(
            language=config.language,
            enable_partial=config.enable_partial,
            partial_interval=config.partial_interval,
            max_segment_seconds=min(settings.streaming.max_segment_seconds, config.max_buffer_duration),
            max_backlog_seconds=settings.streaming.max_backlog_seconds,
            prompt_chars=settings.streaming.prompt_chars,
            word_timestamps=config.word_timestamps,
            task=config.task,
            prompt=config.prompt,
            hotwords=config.hotwords,
            vad=turn_vad(settings.vad) if config.diarization else settings.vad,
        )
        model_name = engine.name

        async def emit(event: SessionEvent) -> None:
            if isinstance(event, EngineFailure):
                await self._fail(StreamError(ErrorType.INTERNAL_ERROR, "the speech engine failed"))
                return
            final = isinstance(event, FinalText)
            self._observe_emission("final" if final else "partial", event.end)
            # The session counts from zero; a resumed stream goes on from where the dropped one committed.
            base, segment = resume.base_seconds, resume.base_segment + event.index
            committed_until = None
            if isinstance(event, FinalText):
                committed_until = round(base + event.end, 3)
                await resume.final(event.text, segment, base + event.end)  # kept before the client has it
            words = None
            if isinstance(event, FinalText) and config.word_timestamps:
                words = [
                    WordTiming(
                        word=w.text.strip(),
                        start=round(base + w.start, 3),
                        end=round(base + w.end, 3),
                        probability=round(w.probability, 4),
                    )
                    for w in event.words
                ]
            speakers = event.speakers if isinstance(event, FinalText) else ()
            frame = TranscriptFrame(
                type="final" if final else "partial",
                text=event.text,
                is_final=final,
                model=model_name,
                segment_id=segment,
                start=round(base + event.start, 3),
                end=round(base + event.end, 3),
                language=event.language if isinstance(event, FinalText) else config.language,
                words=words,
                speaker=event.speaker if isinstance(event, FinalText) else None,
                speakers=list(speakers) if len(speakers) > 1 else None,
                committed_until=committed_until,
            )
            with contextlib.suppress(_SessionEnded):  # the client left; the receive loop will see it
                await self._send(frame)

        session = self._runtime.new_session(engine, options, emit)
        session.carry_over(resume.earlier_finals)
        return session

    async def _serve(
        self, session: LiveSession, audio_input: AudioInput, lease: StreamLease, resume: ResumableStream
    ) -> None:
        idle_timeout = self._runtime.settings.access.idle_timeout_seconds
        while True:
            await self._pace()
            try:
                try:
                    async with asyncio.timeout(idle_timeout):
                        received = await self._receive_frame()
                except TimeoutError:
                    raise StreamError(
                        ErrorType.TIMEOUT, f"no message for {idle_timeout:g} s: closing"
                    ) from None
                # A binary frame is audio in the configured format, as is; a text frame is JSON.
                message = received if isinstance(received, bytes) else parse_client_message(received)
                if self._ending:
                    continue  # shutting down, or the key lapsed: audio after the last utterance is dropped
                if isinstance(message, bytes | AudioMessage):
                    # Decoding and resampling run in a thread, off the event loop (the VAD too: feed).
                    decoded = await asyncio.to_thread(_decode, audio_input, message)
                    seconds = decoded.seconds
                    self._pacing.audio(seconds)
                    if charged := resume.received(seconds):  # audio resent after a resume is free
                        await lease.charge(charged)
                    await session.feed(decoded.samples)
                    self._runtime.metrics.audio_seconds.labels("stream").inc(seconds)
                    self._received_at.append((session.received_seconds, time.monotonic()))
                elif isinstance(message, CommitMessage):
                    await session.feed(audio_input.flush())
                    await self._send(FullTranscriptFrame(text=await session.flush()))
                elif isinstance(message, ResetMessage):
                    audio_input.flush()  # audio from before the reset is dropped, the filter's too
                    session.reset()
                    await resume.reset()
                    await self._send(StatusFrame(state="reset"))
                elif isinstance(message, PingMessage):
                    await self._send(PongFrame())
                elif isinstance(message, StopMessage):
                    await session.feed(audio_input.flush())
                    await self._send(FullTranscriptFrame(text=await session.flush()))
                    await resume.finished()
                    await self._close(CloseCode.NORMAL)
                    return
                else:
                    raise StreamError(ErrorType.BAD_REQUEST, "the session is already configured")
            except StreamError as error:
                if error.close_code is not None:
                    raise
                self._runtime.metrics.errors.labels(error.error_type.value).inc()
                await self._send(error.to_frame())

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
        raise _SessionEnded

    async def _receive_text(self) -> str:
        """The next frame, which must be text (before the config, binary frames have no format yet)."""
        received = await self._receive_frame()
        if isinstance(received, bytes):
            raise StreamError(
                ErrorType.BAD_REQUEST,
                "binary frames are not supported before the config: send JSON text frames",
            )
        return received

    async def _receive_frame(self) -> str | bytes:
        """The next frame, text or binary, counted by the pacing either way."""
        message = await self._ws.receive()
        if message["type"] == "websocket.disconnect":
            self._ended.set()
            raise _SessionEnded
        text, data = message.get("text"), message.get("bytes")
        self._pacing.received(len(text) if text is not None else len(data or b""))
        return str(text) if text is not None else bytes(data or b"")

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

    async def _send(self, frame: ServerFrame) -> None:
        if self._ended.is_set():
            raise _SessionEnded
        async with self._send_lock:
            try:
                await self._ws.send_text(frame.to_json())
            except (WebSocketDisconnect, RuntimeError):
                self._ended.set()
                raise _SessionEnded from None

    def _observe_emission(self, kind: str, end: float) -> None:
        """Delay from receiving the audio at ``end`` (stream seconds) to now."""
        received = next((at for seconds, at in self._received_at if seconds >= end - 1e-3), None)
        if received is not None:
            self._runtime.metrics.emission_delay.labels(kind).observe(time.monotonic() - received)

    async def _fail(self, error: StreamError) -> None:
        self._runtime.metrics.errors.labels(error.error_type.value).inc()
        if error.error_type is ErrorType.QUOTA_EXCEEDED:
            self._runtime.metrics.quota_rejections.labels(error.quota or "unknown").inc()
        log.info(
            "stream error: %s",
            error.message,
            extra={"event": "stream_error", "error_type": error.error_type.value},
        )
        with contextlib.suppress(_SessionEnded):
            await self._send(error.to_frame())
        await self._close(error.close_code or CloseCode.ENGINE_FAILURE)

    async def _close(self, code: CloseCode) -> None:
        if self._ended.is_set() or self._ws.client_state != WebSocketState.CONNECTED:
            return
        self._ended.set()
        async with self._send_lock:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await self._ws.close(code=int(code))


def _decode(audio_input: AudioInput, message: bytes | AudioMessage) -> DecodedAudio:
    """A binary frame's bytes, or a JSON audio frame's base64, decoded and at the engine's rate."""
    if isinstance(message, bytes):
        return audio_input.decode(message)
    return audio_input.decode_base64(message.data)
