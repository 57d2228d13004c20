"""OpenAI's Realtime API for transcription: ``/v1/realtime?intent=transcription`` on the same sessions,
engines, keys and quotas as the seed protocol (``server/lifecycle.py`` runs both).

An *item* is what OpenAI transcribes as one: with ``server_vad`` turn detection, one utterance of the
segmenter (speech_started when it opens, speech_stopped and committed when it closes); with
``turn_detection: null``, everything between two ``input_audio_buffer.commit`` events (the segmenter still
cuts it into utterances, whose finals are joined). Deltas are the words a re-decoding engine holds
stable (LocalAgreement), then the rest of the final: never retracted; ``completed`` carries the final
text, which is decoded afresh and may differ from the deltas in a word or its punctuation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import typing
from dataclasses import dataclass, field

from starlette.websockets import WebSocket

from streamscribe.audio import AudioInput
from streamscribe.engines.base import Engine, EngineUnavailable, UnsupportedLanguage
from streamscribe.engines.registry import UnknownModel, resolve_model
from streamscribe.protocol import G711_SAMPLE_RATE, AudioFormat, ConfigRefused, ErrorType, StreamError
from streamscribe.realtime_protocol import (
    OPENAI_PCM_RATE,
    AudioPcm,
    AudioPcma,
    AudioPcmu,
    Cleared,
    Committed,
    DurationUsage,
    ErrorEvent,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCommit,
    RealtimeRefusal,
    SemanticVad,
    SessionAudio,
    SessionCreated,
    SessionDescription,
    SessionInput,
    SessionUpdate,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionSettings,
    TurnDetection,
    error_event,
    new_id,
    parse_client_event,
)
from streamscribe.server.auth import Principal
from streamscribe.server.lifecycle import LiveStreamConnection, SessionEnded, WireFrame
from streamscribe.server.quotas import StreamLease
from streamscribe.server.runtime import Runtime
from streamscribe.streaming.policy import normalize_word
from streamscribe.streaming.segmenter import Closed, Dropped, Opened, UtteranceEvent
from streamscribe.streaming.session import (
    EngineFailure,
    FinalText,
    LiveSession,
    PartialText,
    SessionEvent,
)
from streamscribe.streaming.vad import VadOptions

log = logging.getLogger(__name__)

REALTIME_PATH = "/v1/realtime"
_FORMAT_PARAM = "session.audio.input.format"
_MODEL_PARAM = "session.audio.input.transcription.model"


@dataclass(frozen=True)
class RealtimeConfig:
    """A transcription session's effective configuration (what ``session.updated`` reports)."""

    format: AudioPcm | AudioPcmu | AudioPcma
    model: str | None
    language: str
    prompt: str | None
    keywords: list[str] | None
    vad: VadOptions | None  # None: turn_detection null, commits end items

    @property
    def wire_format(self) -> tuple[AudioFormat, int]:
        """(``audio.py`` format, sample rate) of the appended audio."""
        if isinstance(self.format, AudioPcmu):
            return AudioFormat.MULAW, G711_SAMPLE_RATE
        if isinstance(self.format, AudioPcma):
            return AudioFormat.ALAW, G711_SAMPLE_RATE
        return AudioFormat.PCM16, OPENAI_PCM_RATE

    def describe(self, session_id: str, model: str) -> SessionDescription:
        vad = self.vad
        turn_detection = (
            TurnDetection(
                threshold=vad.threshold,
                prefix_padding_ms=vad.speech_pad_ms,
                silence_duration_ms=vad.min_silence_ms,
            )
            if vad is not None
            else None
        )
        transcription = TranscriptionSettings(
            model=model, language=self.language, prompt=self.prompt, keywords=self.keywords
        )
        return SessionDescription(
            id=session_id,
            audio=SessionAudio(
                input=SessionInput(
                    format=self.format, transcription=transcription, turn_detection=turn_detection
                )
            ),
        )


@dataclass
class _Item:
    """One item: its id, the utterance it is (server VAD), its finals, and the words sent as deltas."""

    id: str
    utterance: int | None = None
    start: int = 0  # server VAD: the utterance's first sample
    seconds: float = 0.0  # its audio
    finals: list[str] = field(default_factory=list)
    sent: dict[int, list[str]] = field(default_factory=dict)  # per utterance: the words sent as deltas
    any_sent: bool = False

    def delta(self, utterance: int, words: list[str]) -> str | None:
        """The delta that takes this utterance's deltas to ``words``; None when nothing is new or the words
        no longer start with what was sent (a delta is never retracted)."""
        sent = self.sent.setdefault(utterance, [])
        if len(words) <= len(sent):
            return None
        if [normalize_word(w) for w in words[: len(sent)]] != [normalize_word(w) for w in sent]:
            return None
        new = words[len(sent) :]
        sent.extend(new)
        text = (" " if self.any_sent else "") + " ".join(new)
        self.any_sent = True
        return text


class RealtimeConnection(LiveStreamConnection):
    """One client's WebSocket in OpenAI's Realtime API, transcription intent."""

    def __init__(self, websocket: WebSocket, runtime: Runtime) -> None:
        super().__init__(websocket, runtime)
        self._session_id = new_id("sess")
        # Events about items go out in the order they happen: boundaries (from the receive loop) and
        # text (from the session's decode task) take this lock to send.
        self._order = asyncio.Lock()
        self._manual = False
        self._engine_rate = OPENAI_PCM_RATE  # of the session's samples (utterance bounds are in these)
        self._open: _Item | None = None  # server VAD: the open utterance's item; manual: the buffer's
        self._closed: dict[int, _Item] = {}  # committed items waiting for their final, by utterance
        self._last_committed: str | None = None
        self._settle = asyncio.Event()  # set when an item was committed: complete it if it gets no final

    # The lifecycle's hooks ---------------------------------------------------------------------------

    async def _receive_text(self) -> str:
        message = await self._ws.receive()
        if message["type"] == "websocket.disconnect":
            self._ended.set()
            raise SessionEnded
        self._pacing.received(len(message.get("text") or message.get("bytes") or ""))
        if message.get("text") is None:
            raise RealtimeRefusal(ErrorType.BAD_REQUEST, "binary frames are not supported: send JSON events")
        return str(message["text"])

    def _error_frame(self, error: StreamError) -> ErrorEvent:
        return error_event(error)

    async def _wrap_up(self, session: LiveSession) -> None:
        await self._finish(session)

    async def _finish(self, session: LiveSession) -> None:
        """Commit the open item, and complete every committed one."""
        await self._commit(session)
        await session.flush()
        await self._complete_unanswered_now(session)

    async def _stream(self, principal: Principal) -> None:
        lease = await self._open_lease(principal)
        if self._ws.query_params.get("intent") != "transcription":
            raise ConfigRefused(
                ErrorType.BAD_REQUEST,
                f"this server serves transcription sessions only: connect to {REALTIME_PATH}"
                "?intent=transcription",
            )
        defaults = RealtimeConfig(AudioPcm(), None, "en", None, None, self._runtime.settings.vad)
        model = self._runtime.settings.default_model
        await self._send(SessionCreated(session=defaults.describe(self._session_id, model)))
        session, audio_input = await self._configure(defaults, principal, lease)
        settler = asyncio.create_task(self._complete_unanswered(session))
        try:
            await self._serve(session, audio_input, lease)
        finally:
            settler.cancel()
            await asyncio.gather(settler, return_exceptions=True)
            audio_input.close()

    # Configuration -----------------------------------------------------------------------------------

    async def _configure(
        self, defaults: RealtimeConfig, principal: Principal, lease: StreamLease
    ) -> tuple[LiveSession, AudioInput]:
        """Read events until a ``session.update`` configures the session (within the config timeout);
        audio before it is refused."""
        timeout = self._runtime.settings.streaming.config_timeout_seconds
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await self._pace()
            try:
                try:
                    async with asyncio.timeout_at(deadline):
                        received = await self._receive_unless_draining()
                except TimeoutError:
                    raise ConfigRefused(
                        ErrorType.TIMEOUT, f"no session.update within {timeout:g} s"
                    ) from None
                event = parse_client_event(received)
                if not isinstance(event, SessionUpdate):
                    raise RealtimeRefusal(
                        ErrorType.BAD_REQUEST,
                        "no session yet: send session.update (a transcription session) first",
                        code="session_not_configured",
                        event_id=event.event_id,
                    )
                # Choosing (maybe loading) the engine is not part of the time allowed for the update.
                return await self._open_session(event, defaults, principal, lease)
            except StreamError as error:
                if error.close_code is not None:
                    raise
                await self._refuse(error)

    def _config_from(self, update: SessionUpdate, defaults: RealtimeConfig) -> RealtimeConfig:
        """The update applied to the defaults (only the fields it sent), or RealtimeRefusal."""
        refuse = _refusal_for(update.event_id)
        session = update.session
        if session.type != "transcription":
            raise refuse(
                "session.type", 'this server serves transcription sessions only: "type": "transcription"'
            )
        if session.include:
            raise refuse("session.include", "logprobs are not available from this server's engines")
        audio = session.audio.input if session.audio is not None else None
        if audio is None:
            return defaults
        audio_format = audio.format if audio.format is not None else defaults.format
        vad: VadOptions | None = defaults.vad
        if "turn_detection" in audio.model_fields_set:
            turn = audio.turn_detection
            if isinstance(turn, SemanticVad):
                raise refuse(
                    "session.audio.input.turn_detection.type", "semantic_vad is not supported: server_vad"
                )
            if turn is None:
                vad = None
            else:
                base = self._runtime.settings.vad
                vad = base.model_copy(
                    update={
                        "threshold": turn.threshold if turn.threshold is not None else base.threshold,
                        "speech_pad_ms": (
                            turn.prefix_padding_ms
                            if turn.prefix_padding_ms is not None
                            else base.speech_pad_ms
                        ),
                        "min_silence_ms": (
                            turn.silence_duration_ms
                            if turn.silence_duration_ms is not None
                            else base.min_silence_ms
                        ),
                    }
                )
        transcription = audio.transcription
        if transcription is None:
            return RealtimeConfig(audio_format, defaults.model, defaults.language, None, None, vad)
        return RealtimeConfig(
            audio_format,
            transcription.model or defaults.model,
            (transcription.language or defaults.language).strip().lower(),
            (transcription.prompt or "").strip() or None,
            [word.strip() for word in transcription.keywords or [] if word.strip()] or None,
            vad,
        )

    async def _open_session(
        self, update: SessionUpdate, defaults: RealtimeConfig, principal: Principal, lease: StreamLease
    ) -> tuple[LiveSession, AudioInput]:
        config = self._config_from(update, defaults)
        engine = await self._engine(config, update.event_id)
        self._admit(engine)
        settings = self._runtime.settings
        hotwords = ", ".join(config.keywords) if config.keywords else None
        options = self._runtime.session_options(
            config.language, prompt=config.prompt, hotwords=hotwords, vad=config.vad or settings.vad
        )
        self._manual = config.vad is None
        self._engine_rate = engine.sample_rate
        if self._manual:
            self._open = _Item(new_id("item"))
        session = self._start_session(engine, options, self._emit, principal, lease)
        await self._send(SessionUpdated(session=config.describe(self._session_id, engine.name)))
        self._log_start(engine, config.language, "transcribe", "realtime")
        audio_format, rate = config.wire_format
        return session, AudioInput(audio_format, rate, engine.sample_rate, settings.streaming.max_frame_bytes)

    async def _engine(self, config: RealtimeConfig, event_id: str | None) -> Engine:
        refuse = _refusal_for(event_id)
        model_name = config.model or self._runtime.settings.default_model
        try:
            model, variant = resolve_model(model_name)
            choice = await self._runtime.choose_engine(model, variant, config.language)
        except UnknownModel as exc:
            raise refuse(_MODEL_PARAM, str(exc), code=ErrorType.MODEL_NOT_FOUND.value) from None
        except UnsupportedLanguage as exc:
            raise refuse("session.audio.input.transcription.language", str(exc)) from None
        except EngineUnavailable as exc:
            raise StreamError(ErrorType.MODEL_UNAVAILABLE, str(exc)) from None
        if choice.fallback_reason is not None:  # session.updated names the engine that answers
            log.warning(
                choice.fallback_reason, extra={"event": "engine_fallback", "engine": choice.engine.name}
            )
        return choice.engine

    # Serving -----------------------------------------------------------------------------------------

    async def _serve(self, session: LiveSession, audio_input: AudioInput, lease: StreamLease) -> None:
        while True:
            await self._pace()
            try:
                event = parse_client_event(await self._within_idle_timeout(self._receive_text()))
                if self._ending:
                    continue  # shutting down, or the key lapsed: audio after the last utterance is dropped
                if isinstance(event, InputAudioBufferAppend):
                    try:
                        # Decoding and resampling run in a thread, off the event loop (the VAD too: feed).
                        decoded = await asyncio.to_thread(audio_input.decode_base64, event.audio)
                    except StreamError as error:
                        raise RealtimeRefusal(
                            error.error_type, error.message, param="audio", event_id=event.event_id
                        ) from None
                    seconds = decoded.seconds
                    self._pacing.audio(seconds)
                    await lease.charge(seconds)
                    await self._take(await session.feed(decoded.samples))
                    if self._manual and self._open is not None:
                        self._open.seconds += seconds
                    self._received_audio(session, seconds)
                elif isinstance(event, InputAudioBufferCommit):
                    await self._take(await session.feed(audio_input.flush()))
                    if not await self._commit(session):
                        raise RealtimeRefusal(
                            ErrorType.BAD_REQUEST,
                            "nothing to commit: no audio since the last item"
                            if self._manual
                            else "nothing to commit: no speech since the last item",
                            code="input_audio_buffer_commit_empty",
                            event_id=event.event_id,
                        )
                elif isinstance(event, InputAudioBufferClear):
                    await self._clear(session, audio_input)
                else:
                    raise RealtimeRefusal(
                        ErrorType.BAD_REQUEST,
                        "the session is already configured: open a new connection to change it",
                        code="session_already_configured",
                        event_id=event.event_id,
                    )
            except StreamError as error:
                if error.close_code is not None:
                    raise
                await self._refuse(error)

    async def _take(self, events: list[UtteranceEvent]) -> None:
        """Report where speech started and stopped (server VAD); each utterance it closed is an item."""
        if self._manual:
            return
        frames: list[WireFrame] = []
        for event in events:  # the items change now, before any await: the decode task reads them
            if isinstance(event, Opened):
                self._open = _Item(new_id("item"), utterance=event.index, start=event.start)
                frames.append(SpeechStarted(audio_start_ms=self._ms(event.start), item_id=self._open.id))
            elif isinstance(event, Closed) and self._open is not None:
                item, self._open = self._open, None
                utterance = event.utterance
                item.seconds = (utterance.end - utterance.start) / self._engine_rate
                self._closed[utterance.index] = item
                frames.append(SpeechStopped(audio_end_ms=self._ms(utterance.end), item_id=item.id))
                frames.append(self._committed(item))
                self._settle.set()
            elif isinstance(event, Dropped) and self._open is not None:
                # Too short to be speech: the item ends with no text.
                item, self._open = self._open, None
                assert self._session is not None
                end_ms = round(self._session.received_seconds * 1000)
                frames.append(SpeechStopped(audio_end_ms=end_ms, item_id=item.id))
                frames.append(self._committed(item))
                frames.append(_completed(item, ""))
        async with self._order:
            for frame in frames:
                await self._send(frame)

    async def _commit(self, session: LiveSession) -> bool:
        """End the open item: committed, its final, then completed; False when there is none (manual: no
        audio since the last commit; server VAD: no speech open)."""
        item = self._open
        if item is None or (self._manual and item.seconds == 0):
            return False
        if self._manual:
            async with self._order:
                await self._send(self._committed(item))
            await session.flush()
            self._open = _Item(new_id("item"))
            async with self._order:
                await self._send(_completed(item, " ".join(item.finals)))
            return True
        # Server VAD, committed by the client mid-speech: the utterance ends here.
        assert item.utterance is not None
        self._open = None
        item.seconds = session.received_seconds - item.start / self._engine_rate
        self._closed[item.utterance] = item
        async with self._order:
            await self._send(self._committed(item))
        await session.flush()
        await self._complete_unanswered_now(session)
        return True

    async def _clear(self, session: LiveSession, audio_input: AudioInput) -> None:
        """Drop the audio not yet committed; committed items still get their text first."""
        await session.finals_done()
        await self._complete_unanswered_now(session)
        audio_input.flush()  # the filter's audio too
        session.reset()
        self._closed.clear()
        self._open = _Item(new_id("item")) if self._manual else None
        async with self._order:
            await self._send(Cleared())

    async def _emit(self, event: SessionEvent) -> None:
        if isinstance(event, EngineFailure):
            await self._fail(StreamError(ErrorType.INTERNAL_ERROR, "the speech engine failed"))
            return
        frames: list[WireFrame] = []
        if isinstance(event, PartialText):
            self._observe_emission("partial", event.end)
            item = self._open
            if item is not None and (self._manual or item.utterance == event.index):
                delta = item.delta(event.index, event.text.split()[: event.stable_words])
                if delta:
                    frames.append(TranscriptionDelta(item_id=item.id, delta=delta))
        elif isinstance(event, FinalText):
            self._observe_emission("final", event.end)
            found = self._open if self._manual else self._closed.pop(event.index, None)
            if found is not None:
                delta = found.delta(event.index, event.text.split())
                if delta:
                    frames.append(TranscriptionDelta(item_id=found.id, delta=delta))
                found.finals.append(event.text)
                if not self._manual:
                    frames.append(_completed(found, event.text))
        with contextlib.suppress(SessionEnded):  # the client left; the receive loop will see it
            async with self._order:
                for frame in frames:
                    await self._send(frame)

    async def _complete_unanswered(self, session: LiveSession) -> None:
        """Committed items whose utterance got no final (no words in it) are completed with no text."""
        while True:
            await self._settle.wait()
            self._settle.clear()
            await self._complete_unanswered_now(session)

    async def _complete_unanswered_now(self, session: LiveSession) -> None:
        while True:
            await session.finals_done()
            if session.settled:  # still, now: every final owed so far has been emitted
                break
        unanswered = list(self._closed.values())
        self._closed.clear()
        with contextlib.suppress(SessionEnded):
            async with self._order:
                for item in unanswered:
                    await self._send(_completed(item, ""))

    async def _refuse(self, error: StreamError) -> None:
        """A non-fatal error: the session goes on."""
        self._count_error(error)
        await self._send(error_event(error))

    def _committed(self, item: _Item) -> Committed:
        committed = Committed(item_id=item.id, previous_item_id=self._last_committed)
        self._last_committed = item.id
        return committed

    def _ms(self, sample: int) -> int:
        return round(sample * 1000 / self._engine_rate)


def _completed(item: _Item, transcript: str) -> TranscriptionCompleted:
    return TranscriptionCompleted(
        item_id=item.id, transcript=transcript, usage=DurationUsage(seconds=round(item.seconds, 3))
    )


def _refusal_for(event_id: str | None) -> typing.Callable[..., RealtimeRefusal]:
    def refuse(param: str, message: str, code: str | None = None) -> RealtimeRefusal:
        return RealtimeRefusal(ErrorType.BAD_REQUEST, message, param=param, code=code, event_id=event_id)

    return refuse
