"""The streaming WebSocket: authenticate, configure, then turn audio frames into transcript frames."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from streamscribe.audio import AudioInput, DecodedAudio
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
from streamscribe.server.resume import ResumableStream
from streamscribe.streaming.diarization import StreamSpeakers, turn_vad
from streamscribe.streaming.session import (
    EngineFailure,
    FinalText,
    LiveSession,
    SessionEvent,
)

log = logging.getLogger(__name__)


class StreamConnection(LiveStreamConnection):
    """One client's WebSocket in the seed protocol (``protocol.py``), from accept to close."""

    _audio_input: AudioInput | None = None
    _resume: ResumableStream | None = None

    async def _stream(self, principal: Principal) -> None:
        config = await self._receive_config()
        resume = self._resume = await self._runtime.resumes.start(principal.user_id, config.resume)
        try:
            lease = await self._open_lease(principal, resume.slot)
        except StreamError:
            await resume.finished()  # refused: there is nothing to resume
            raise
        engine, audio_input = await self._start(config)
        self._audio_input = audio_input
        diarizer = await self._runtime.diarizer() if config.diarization else None
        self._admit(engine)
        await self._send(
            StatusFrame(
                state="ready",
                model=engine.name,
                resume_token=resume.token,
                resume_from=round(resume.base_seconds, 3),
            )
        )
        self._log_start(engine, config.language, config.task, "seed")
        session = self._new_session(config, engine, principal, lease, resume)
        if diarizer is not None:
            session.label_speakers(StreamSpeakers(diarizer))
        await self._serve(session, audio_input, lease, resume)

    async def _session_closed(self, lease: StreamLease) -> None:
        if self._audio_input is not None:
            self._audio_input.close()
        if self._resume is not None:
            await self._resume.dropped(lease)  # unless the client stopped it: then there is nothing to resume

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

    def _new_session(
        self,
        config: ConfigMessage,
        engine: Engine,
        principal: Principal,
        lease: StreamLease,
        resume: ResumableStream,
    ) -> LiveSession:
        settings = self._runtime.settings
        options = self._runtime.session_options(
            config.language,
            enable_partial=config.enable_partial,
            partial_interval=config.partial_interval,
            max_segment_seconds=min(settings.streaming.max_segment_seconds, config.max_buffer_duration),
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
            with contextlib.suppress(SessionEnded):  # the client left; the receive loop will see it
                await self._send(frame)

        session = self._start_session(engine, options, emit, principal, lease)
        session.carry_over(resume.earlier_finals)
        watcher = self._end_when_resumed_elsewhere(resume, lease.heartbeat_seconds)
        self._watchers.append(asyncio.create_task(watcher))
        return session

    async def _end_when_resumed_elsewhere(self, resume: ResumableStream, every: float) -> None:
        """When the stream is resumed on another connection, this one (whose socket is most likely half
        open) ends: at once in this process, else at the next check, as often as the lease refreshes its
        slot. The check also keeps the resume point from lapsing while the stream is silent."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(resume.superseded.wait(), every)
            if not await resume.still_here():
                break
        self._ending = True
        log.info("stream resumed on another connection: this one ends", extra={"event": "stream_superseded"})
        await self._close(CloseCode.GOING_AWAY)

    async def _serve(
        self, session: LiveSession, audio_input: AudioInput, lease: StreamLease, resume: ResumableStream
    ) -> None:
        while True:
            await self._pace()
            try:
                received = await self._within_idle_timeout(self._receive_frame())
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
                    self._received_audio(session, seconds)
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
            raise SessionEnded
        text, data = message.get("text"), message.get("bytes")
        self._pacing.received(len(text) if text is not None else len(data or b""))
        return str(text) if text is not None else bytes(data or b"")


def _decode(audio_input: AudioInput, message: bytes | AudioMessage) -> DecodedAudio:
    """A binary frame's bytes, or a JSON audio frame's base64, decoded and at the engine's rate."""
    if isinstance(message, bytes):
        return audio_input.decode(message)
    return audio_input.decode_base64(message.data)
