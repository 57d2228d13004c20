"""Wyoming, the voice protocol of Home Assistant, over TCP (``serve --wyoming-port``).

One connection may ask ``describe`` (answered by ``info``: our engines and their languages) and any number
of transcriptions, each ``transcribe`` (optional: model ``name`` and ``language``), ``audio-start``,
``audio-chunk``\\*, ``audio-stop``. The server answers ``transcript-start`` at ``audio-start``, a
``transcript-chunk`` for each final as soon as it is decoded (the chunks, joined, are the transcript),
then ``transcript`` and ``transcript-stop`` after ``audio-stop``. Partials are not sent: Wyoming's chunks
are appended, never revised.

The audio goes through the same live sessions, engines and schedulers as the WebSocket
(``Runtime.new_session``), at any rate, width and channel count a chunk declares (downmixed and
resampled to the engine's rate). Wyoming has no keys: whoever reaches the port may transcribe, so it
listens on 127.0.0.1 unless ``wyoming_host`` says otherwise, and ``access.ip_allowlist`` applies. Its audio
is charged to no key's quota; ``max_streams`` and the engines' overload refusal bound it as any stream.

Errors are Wyoming's ``error`` event, its ``code`` the ``ErrorType`` of ``protocol.py``. What would end a
WebSocket stream (a refused ``audio-start``, server_busy, an engine failure, the idle timeout) ends the
connection after the error; ``bad_request`` and ``invalid_audio`` (an unknown event, a chunk outside a
transcription, a chunk the server cannot read) leave it as it was. An event that cannot be read (not
JSON, larger than the limits) ends the connection, since the start of the next one cannot be found.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.ping import Ping, Pong

from streamscribe import __version__
from streamscribe.audio import StreamResampler, decode_pcm
from streamscribe.engines.base import EngineUnavailable, UnsupportedLanguage
from streamscribe.engines.registry import EngineStatus, UnknownModel, resolve_model
from streamscribe.protocol import (
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    ConfigRefused,
    ErrorType,
    StreamError,
)
from streamscribe.server.logs import new_request_id
from streamscribe.server.pacing import StreamPacing
from streamscribe.server.runtime import Runtime
from streamscribe.streaming.session import EngineFailure, FinalText, LiveSession, SessionEvent

log = logging.getLogger(__name__)

PROGRAM_NAME = "streamscribe"
# An event's JSON header line, and its JSON data, are refused past this (a chunk's audio has its own limit).
MAX_EVENT_JSON_BYTES = 64 * 1024
# After its last event the server reads (and drops) what the client still sends for at most this long, so
# that its close does not reset a connection with unread bytes: a reset can destroy the error event the
# client has not read yet.
LINGER_SECONDS = 2.0


class _DrainStarted(Exception):
    """The server began shutting down while a connection waited for its next event."""


class UnreadableEvent(Exception):
    """The byte stream is not Wyoming's (or exceeds the limits): the next event's start is lost."""


async def read_event(reader: asyncio.StreamReader, max_payload_bytes: int) -> Event | None:
    """The next event, or None when the peer has gone (also mid-event). Unlike the wyoming package's
    reader, which reads whatever length a header claims, this refuses headers, data and payloads past the
    limits before reading them. Raises UnreadableEvent."""
    try:
        line = await reader.readline()
    except ValueError:  # the stream's limit (MAX_EVENT_JSON_BYTES) passed without a newline
        raise UnreadableEvent(f"event header longer than {MAX_EVENT_JSON_BYTES} bytes") from None
    if not line.endswith(b"\n"):
        return None
    try:
        header = json.loads(line)
    except ValueError:
        raise UnreadableEvent("event header is not a JSON line") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise UnreadableEvent('event header is not a JSON object with a "type"')
    data = header.get("data") or {}
    data_length = header.get("data_length") or 0
    payload_length = header.get("payload_length") or 0
    if not isinstance(data, dict) or not isinstance(data_length, int) or not isinstance(payload_length, int):
        raise UnreadableEvent("event header has a malformed data, data_length or payload_length")
    if not 0 <= data_length <= MAX_EVENT_JSON_BYTES:
        raise UnreadableEvent(f"event data larger than {MAX_EVENT_JSON_BYTES} bytes")
    if not 0 <= payload_length <= max_payload_bytes:
        raise UnreadableEvent(f"event payload larger than {max_payload_bytes} bytes")
    try:
        if data_length:
            extra = json.loads(await reader.readexactly(data_length))
            if not isinstance(extra, dict):
                raise UnreadableEvent("event data is not a JSON object")
            data.update(extra)
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        return None
    except ValueError:
        raise UnreadableEvent("event data is not JSON") from None
    return Event(type=header["type"], data=data, payload=payload)


def describe(statuses: list[EngineStatus]) -> Info:
    """The ``info`` event: one ASR program, one model per engine that can run here."""
    attribution = Attribution(name="streamscribe", url="https://github.com/streamscribe/streamscribe")
    models = [
        AsrModel(
            name=model_name(status),
            attribution=attribution,
            installed=True,
            description=f"{status.model} ({status.variant})",
            version=None,
            languages=_languages(status),
        )
        for status in statuses
        if status.available
    ]
    program = AsrProgram(
        name=PROGRAM_NAME,
        attribution=attribution,
        installed=True,
        description="Real-time speech-to-text server",
        version=__version__,
        models=models,
        supports_transcript_streaming=True,
    )
    return Info(asr=[program])


def model_name(status: EngineStatus) -> str:
    """A name ``resolve_model`` takes back: ``whisper``, or model-variant as ``streamscribe models``."""
    return status.model if status.model == "whisper" else f"{status.model}-{status.variant}"


def _languages(status: EngineStatus) -> list[str]:
    if "..." not in status.languages:
        return list(status.languages)
    # The multilingual Whisper: every language its tokenizer knows (faster-whisper's own list).
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return ["en", *sorted(code for code in _LANGUAGE_CODES if code != "en")]


def wyoming_language(language: str | None) -> str:
    """Home Assistant's language tag (``en``, ``en-US``, ``de_DE``) as the engines' code."""
    return (language or "en").strip().lower().replace("_", "-").split("-")[0] or "en"


@dataclass
class _Transcription:
    """One ``audio-start`` .. ``audio-stop``: its session, the resampler for the chunks' rate, and the
    text sent so far as transcript chunks."""

    session: LiveSession
    language: str
    engine_rate: int
    in_rate: int
    resampler: StreamResampler
    chunks: list[str] = field(default_factory=list)
    failure: StreamError | None = None

    def resample(self, samples: np.ndarray, rate: int) -> np.ndarray:
        """At the engine's rate; a chunk with a new rate starts a new resampler, after the old one's tail."""
        tail = np.zeros(0, dtype=np.float32)
        if rate != self.in_rate:
            tail = self.resampler.flush()
            self.in_rate, self.resampler = rate, StreamResampler(rate, self.engine_rate)
        return np.concatenate([tail, self.resampler(samples)])


class WyomingConnection:
    """One Wyoming client, from connect to close."""

    def __init__(self, runtime: Runtime, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._runtime = runtime
        self._reader = reader
        self._writer = writer
        self._send_lock = asyncio.Lock()
        self._pacing = StreamPacing(runtime.settings.streaming)
        self._request = Transcribe()
        self._transcription: _Transcription | None = None
        self._reading: asyncio.Future[Event | None] | None = None
        self._drain_deadline: float | None = None

    async def run(self) -> None:
        new_request_id("wyoming")
        peer = self._writer.get_extra_info("peername")
        try:
            if not self._runtime.access.allowlist.allows(peer[0] if peer else None):
                log.warning("Wyoming client from an address off the allowlist refused")
                raise StreamError(ErrorType.FORBIDDEN, "connections from this address are not allowed")
            await self._serve()
        except StreamError as error:
            await self._send_error(error)
        except UnreadableEvent as exc:
            await self._send_error(StreamError(ErrorType.BAD_REQUEST, str(exc)))
        except ConnectionError:
            pass
        except Exception:
            log.exception("unexpected error in a Wyoming connection")
            await self._send_error(StreamError(ErrorType.INTERNAL_ERROR, "internal server error"))
        finally:
            if self._reading is not None:
                self._reading.cancel()
                await asyncio.wait({self._reading})  # the reader is free again for _close
            await self._end_transcription()
            await self._close()

    async def _close(self) -> None:
        """Half-close (the client reads every event, then the end), read the client's leftovers until it
        closes too or LINGER_SECONDS pass, then close. A connection cancelled by the server's close does not
        linger."""
        task = asyncio.current_task()
        cancelled = task is not None and task.cancelling() > 0
        if not cancelled and not self._writer.is_closing() and self._writer.can_write_eof():
            with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
                self._writer.write_eof()
                async with asyncio.timeout(LINGER_SECONDS):
                    while await self._reader.read(MAX_EVENT_JSON_BYTES):
                        pass
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def _serve(self) -> None:
        while not self._finished_draining():
            await self._pace()
            try:
                event = await self._next_event()
            except _DrainStarted:
                continue
            if event is None:
                return
            self._pacing.received(len(event.payload or b""))
            try:
                await self._handle(event)
            except StreamError as error:
                if error.close_code is not None:
                    raise
                await self._send_error(error)
        if self._transcription is not None:  # shutting down: the transcript of what came so far
            await self._finish_transcription()

    def _finished_draining(self) -> bool:
        """Shutting down, and this connection is done: no transcription, its utterance has ended, or
        half the grace time has passed (the other half is for decoding it)."""
        if not self._runtime.draining.is_set():
            return False
        now = time.monotonic()
        if self._drain_deadline is None:
            self._drain_deadline = now + self._runtime.settings.shutdown_grace_seconds / 2
        transcription = self._transcription
        return transcription is None or not transcription.session.in_utterance or now >= self._drain_deadline

    async def _next_event(self) -> Event | None:
        """The next event, or None when the peer has gone. _DrainStarted when the server starts shutting down
        first (the read goes on: a half-read event is never dropped); StreamError(timeout) after the idle
        time."""
        idle = self._runtime.settings.access.idle_timeout_seconds
        if self._reading is None:
            self._reading = asyncio.ensure_future(
                read_event(self._reader, self._runtime.settings.streaming.max_frame_bytes)
            )
        waiting: set[asyncio.Future[Any]] = {self._reading}
        draining = None
        if self._runtime.draining.is_set():
            assert self._drain_deadline is not None
            idle = min(idle, max(0.0, self._drain_deadline - time.monotonic()))
        else:
            draining = asyncio.ensure_future(self._runtime.draining.wait())
            waiting.add(draining)
        try:
            done, _ = await asyncio.wait(waiting, timeout=idle, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if draining is not None:
                draining.cancel()
        if self._reading in done:
            reading, self._reading = self._reading, None
            return reading.result()
        if self._runtime.draining.is_set():
            raise _DrainStarted
        raise StreamError(ErrorType.TIMEOUT, f"no event for {idle:g} s: closing")

    async def _handle(self, event: Event) -> None:
        if AudioChunk.is_type(event.type):
            await self._audio(event)
        elif Describe.is_type(event.type):
            await self._send(describe(self._runtime.registry.status()).event())
        elif Transcribe.is_type(event.type):
            if self._transcription is not None:
                raise StreamError(ErrorType.BAD_REQUEST, "transcribe during a transcription: send audio-stop")
            request = Transcribe.from_event(event)
            if not all(isinstance(value, str | None) for value in (request.name, request.language)):
                raise StreamError(ErrorType.BAD_REQUEST, "transcribe: name and language must be strings")
            self._request = request
        elif AudioStart.is_type(event.type):
            await self._start(event)
        elif AudioStop.is_type(event.type):
            if self._transcription is None:
                raise StreamError(ErrorType.BAD_REQUEST, "audio-stop before audio-start")
            await self._finish_transcription()
        elif Ping.is_type(event.type):
            await self._send(Pong(text=Ping.from_event(event).text).event())
        else:
            raise StreamError(ErrorType.BAD_REQUEST, f"unknown event type {event.type[:64]!r}")

    async def _start(self, event: Event) -> None:
        """Start a transcription: the engine the last ``transcribe`` asked for, a stream slot, a session."""
        if self._transcription is not None:
            raise StreamError(ErrorType.BAD_REQUEST, "audio-start during a transcription: send audio-stop")
        rate = _audio_rate(event, ConfigRefused)
        request, self._request = self._request, Transcribe()
        language = wyoming_language(request.language)
        runtime = self._runtime
        asked = request.name if request.name != PROGRAM_NAME else None
        name = asked or runtime.settings.default_model
        try:
            model, variant = resolve_model(name)
            choice = await runtime.choose_engine(model, variant, language)
        except (UnknownModel, UnsupportedLanguage) as exc:
            raise ConfigRefused(ErrorType.BAD_REQUEST, f"invalid transcribe: {exc}") from None
        except EngineUnavailable as exc:
            raise StreamError(ErrorType.MODEL_UNAVAILABLE, str(exc)) from None
        engine = choice.engine
        runtime.admit(engine)  # max_streams, overload: StreamError(server_busy)
        runtime.stream_opened()
        options = runtime.session_options(language, enable_partial=False)
        session = runtime.new_session(engine, options, self._emit)
        self._transcription = _Transcription(
            session, language, engine.sample_rate, rate, StreamResampler(rate, engine.sample_rate)
        )
        runtime.metrics.streams.inc()
        log.info(
            "Wyoming transcription started",
            extra={"event": "wyoming_start", "engine": engine.name, "language": language},
        )
        await self._send(TranscriptStart(language=language).event())

    async def _audio(self, event: Event) -> None:
        transcription = self._transcription
        if transcription is None:
            raise StreamError(ErrorType.BAD_REQUEST, "audio-chunk before audio-start")
        self._raise_failure()
        rate = _audio_rate(event, StreamError)
        raw = event.payload or b""
        samples = await asyncio.to_thread(
            decode_pcm, raw, int(event.data.get("width", 0)), int(event.data.get("channels", 0))
        )
        seconds = len(samples) / rate
        self._pacing.audio(seconds)
        resampled = await asyncio.to_thread(transcription.resample, samples, rate)
        await transcription.session.feed(resampled)
        self._runtime.metrics.audio_seconds.labels("wyoming").inc(seconds)

    async def _finish_transcription(self) -> None:
        """Every final of what was received, then ``transcript`` and ``transcript-stop``."""
        transcription = self._transcription
        assert transcription is not None
        await transcription.session.feed(transcription.resampler.flush())
        await transcription.session.flush()
        self._raise_failure()
        text = "".join(transcription.chunks)
        await self._end_transcription()
        await self._send(Transcript(text=text, language=transcription.language).event())
        await self._send(TranscriptStop().event())

    async def _end_transcription(self) -> None:
        transcription, self._transcription = self._transcription, None
        if transcription is None:
            return
        await transcription.session.close()
        self._runtime.release()
        self._runtime.stream_closed()
        log.info(
            "Wyoming transcription ended",
            extra={"event": "wyoming_end", "audio_seconds": round(transcription.session.received_seconds, 2)},
        )

    def _raise_failure(self) -> None:
        if self._transcription is not None and self._transcription.failure is not None:
            raise self._transcription.failure

    async def _emit(self, event: SessionEvent) -> None:
        transcription = self._transcription
        if transcription is None:
            return
        if isinstance(event, EngineFailure):
            transcription.failure = StreamError(ErrorType.INTERNAL_ERROR, "the speech engine failed")
            return
        if isinstance(event, FinalText) and event.text.strip():
            text = event.text.strip()
            piece = f" {text}" if transcription.chunks else text
            transcription.chunks.append(piece)
            with contextlib.suppress(ConnectionError):  # the client left; the read loop will see it
                await self._send(TranscriptChunk(text=piece).event())

    async def _pace(self) -> None:
        """Read on only within the connection's budget (server/pacing.py): the excess waits in TCP."""
        delay = self._pacing.wait()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _send(self, event: Event) -> None:
        """Raises ConnectionError when the peer has gone (uvloop says so with a RuntimeError)."""
        async with self._send_lock:
            if self._writer.is_closing():
                raise ConnectionResetError("the Wyoming client has gone")
            try:
                await async_write_event(event, self._writer)
            except RuntimeError:
                raise ConnectionResetError("the Wyoming client has gone") from None

    async def _send_error(self, error: StreamError) -> None:
        self._runtime.metrics.errors.labels(error.error_type.value).inc()
        log.info(
            "Wyoming error: %s",
            error.message,
            extra={"event": "wyoming_error", "error_type": error.error_type.value},
        )
        with contextlib.suppress(ConnectionError):
            await self._send(Error(text=error.message, code=error.error_type.value).event())


def _audio_rate(event: Event, error: type[StreamError]) -> int:
    """The rate an ``audio-start`` or ``audio-chunk`` declares; its width and channels are checked when
    its audio is decoded (``audio.decode_pcm``)."""
    rate = event.data.get("rate")
    if not isinstance(rate, int) or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise error(
            ErrorType.INVALID_AUDIO, f"rate {rate!r}: expected {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz"
        )
    for name in ("width", "channels"):
        if not isinstance(event.data.get(name), int):
            raise error(ErrorType.INVALID_AUDIO, f"{event.type} has no integer {name}")
    return rate


class WyomingServer:
    """The Wyoming listener, on the HTTP server's event loop and runtime; it stops taking connections when
    the server starts draining, and the drain waits for its transcriptions as for WebSocket streams."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._stop_on_drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self._runtime.settings
        self._server = await asyncio.start_server(
            self._accept, settings.wyoming_host, settings.wyoming_port, limit=MAX_EVENT_JSON_BYTES
        )
        self._stop_on_drain = asyncio.create_task(self._close_on_drain())
        log.info(
            "Wyoming on tcp://%s:%s",
            settings.wyoming_host,
            settings.wyoming_port,
            extra={"event": "wyoming_listening", "port": settings.wyoming_port},
        )

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            # Cancelled by ``close`` when it outlives the drain: asyncio would log that as an error.
            with contextlib.suppress(asyncio.CancelledError):
                await WyomingConnection(self._runtime, reader, writer).run()
        finally:
            self._connections.discard(task)

    async def _close_on_drain(self) -> None:
        await self._runtime.draining.wait()
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop listening and end the connections still open (after the drain)."""
        if self._stop_on_drain is not None:
            self._stop_on_drain.cancel()
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
