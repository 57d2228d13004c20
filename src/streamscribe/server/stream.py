"""The streaming WebSocket: authenticate, configure, then turn audio frames into transcript frames."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np

from streamscribe.audio import AudioFormat, StreamResampler, decode_audio_payload
from streamscribe.engines.base import Engine, EngineUnavailable, UnsupportedLanguage
from streamscribe.engines.registry import UnknownModel, resolve_model
from streamscribe.protocol import (
    AudioMessage,
    CloseCode,
    CommitMessage,
    ConfigMessage,
    ConfigRefused,
    ErrorFrame,
    ErrorType,
    FullTranscriptFrame,
    PingMessage,
    PongFrame,
    ResetMessage,
    StatusFrame,
    StopMessage,
    StreamError,
    TranscriptFrame,
    WarningFrame,
    WordTiming,
    parse_client_message,
)
from streamscribe.server.auth import Principal
from streamscribe.server.lifecycle import LiveStreamConnection, SessionEnded
from streamscribe.server.quotas import StreamLease
from streamscribe.streaming.session import (
    EngineFailure,
    FinalText,
    LiveSession,
    SessionEvent,
    SessionOptions,
)

log = logging.getLogger(__name__)


class StreamConnection(LiveStreamConnection):
    """One client's WebSocket in the seed protocol (``protocol.py``), from accept to close."""

    async def _stream(self, principal: Principal, lease: StreamLease) -> None:
        config = await self._receive_config()
        engine, resampler = await self._start(config)
        self._admit(engine)
        await self._send(StatusFrame(state="ready", model=engine.name))
        log.info(
            "stream started",
            extra={
                "event": "stream_start",
                "engine": engine.name,
                "language": config.language,
                "task": config.task,
            },
        )
        session = self._new_session(config, engine, principal, lease)
        await self._serve(config, session, resampler, lease)

    def _error_frame(self, error: StreamError) -> ErrorFrame:
        return error.to_frame()

    async def _wrap_up(self, session: LiveSession) -> None:
        await self._send(FullTranscriptFrame(text=await session.flush()))

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

    async def _start(self, config: ConfigMessage) -> tuple[Engine, StreamResampler]:
        """The engine for the config (a fallback announced with a warning frame) and the resampler to it."""
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
        return engine, StreamResampler(config.sample_rate, engine.sample_rate)

    def _new_session(
        self, config: ConfigMessage, engine: Engine, principal: Principal, lease: StreamLease
    ) -> LiveSession:
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
            vad=settings.vad,
        )
        model_name = engine.name

        async def emit(event: SessionEvent) -> None:
            if isinstance(event, EngineFailure):
                await self._fail(StreamError(ErrorType.INTERNAL_ERROR, "the speech engine failed"))
                return
            final = isinstance(event, FinalText)
            self._observe_emission("final" if final else "partial", event.end)
            words = None
            if isinstance(event, FinalText) and config.word_timestamps:
                words = [
                    WordTiming(
                        word=w.text.strip(),
                        start=round(w.start, 3),
                        end=round(w.end, 3),
                        probability=round(w.probability, 4),
                    )
                    for w in event.words
                ]
            frame = TranscriptFrame(
                type="final" if final else "partial",
                text=event.text,
                is_final=final,
                model=model_name,
                segment_id=event.index,
                start=round(event.start, 3),
                end=round(event.end, 3),
                language=event.language if isinstance(event, FinalText) else config.language,
                words=words,
            )
            with contextlib.suppress(SessionEnded):  # the client left; the receive loop will see it
                await self._send(frame)

        return self._start_session(engine, options, emit, principal, lease)

    async def _serve(
        self,
        config: ConfigMessage,
        session: LiveSession,
        resampler: StreamResampler,
        lease: StreamLease,
    ) -> None:
        max_bytes = self._runtime.settings.streaming.max_frame_bytes
        while True:
            await self._pace()
            try:
                text = await self._receive_within_idle_timeout()
                message = parse_client_message(text)
                if self._ending:
                    continue  # shutting down, or the key lapsed: audio after the last utterance is dropped
                if isinstance(message, AudioMessage):
                    # Decoding and resampling run in a thread, off the event loop (the VAD too: feed).
                    count, samples = await asyncio.to_thread(
                        _decode_and_resample, message.data, config.audio_format, max_bytes, resampler
                    )
                    seconds = count / config.sample_rate
                    self._pacing.audio(seconds)
                    await lease.charge(seconds)
                    await session.feed(samples)
                    self._received_audio(session, seconds)
                elif isinstance(message, CommitMessage):
                    await session.feed(resampler.flush())
                    await self._send(FullTranscriptFrame(text=await session.flush()))
                elif isinstance(message, ResetMessage):
                    resampler.flush()  # audio from before the reset is dropped, the filter's too
                    session.reset()
                    await self._send(StatusFrame(state="reset"))
                elif isinstance(message, PingMessage):
                    await self._send(PongFrame())
                elif isinstance(message, StopMessage):
                    await session.feed(resampler.flush())
                    await self._send(FullTranscriptFrame(text=await session.flush()))
                    await self._close(CloseCode.NORMAL)
                    return
                else:
                    raise StreamError(ErrorType.BAD_REQUEST, "the session is already configured")
            except StreamError as error:
                if error.close_code is not None:
                    raise
                self._runtime.metrics.errors.labels(error.error_type.value).inc()
                await self._send(error.to_frame())

    async def _receive_text(self) -> str:
        message = await self._ws.receive()
        if message["type"] == "websocket.disconnect":
            self._ended.set()
            raise SessionEnded
        self._pacing.received(len(message.get("text") or message.get("bytes") or ""))
        if message.get("text") is None:
            raise StreamError(ErrorType.BAD_REQUEST, "binary frames are not supported: send JSON text frames")
        return str(message["text"])


def _decode_and_resample(
    data: str, audio_format: AudioFormat, max_bytes: int, resampler: StreamResampler
) -> tuple[int, np.ndarray]:
    """(samples in the frame as sent, the frame at the engine's rate)."""
    samples = decode_audio_payload(data, audio_format, max_bytes)
    return len(samples), resampler(samples)
