"""OpenAI-compatible file API: ``/v1/audio/transcriptions``, ``/v1/audio/translations``, ``/v1/models``.

The official ``openai`` client works against it unchanged (``base_url=".../v1"``, the API key as its key).
Files are decoded with PyAV (any format FFmpeg's libraries read), cut by the VAD into utterances, and
each piece goes through the same decode queue as live streams.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated, Any, Literal

import av
import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from streamscribe.audio import declared_seconds, iter_audio_file
from streamscribe.engines.base import AudioWindow, Engine, EngineUnavailable, Transcript, UnsupportedLanguage
from streamscribe.engines.registry import UnknownModel, resolve_model
from streamscribe.offline import (
    FileOptions,
    TimedText,
    file_utterances_async,
    render,
    transcribe_file_async,
)
from streamscribe.protocol import ERRORS, ErrorType, Quota, StreamError, quota_exceeded
from streamscribe.server.auth import Principal, require_principal
from streamscribe.server.quotas import StreamLease
from streamscribe.server.runtime import Runtime
from streamscribe.streaming.diarization import Diarizer, SpeakerLabel, turn_vad
from streamscribe.streaming.scheduler import Priority
from streamscribe.streaming.segmenter import Segmenter

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
SUPPORTED_FORMATS = "wav, flac, mp3, ogg/opus, m4a/aac, webm"


class ApiError(HTTPException):
    """An error of the file API: sent in OpenAI's shape with its type's HTTP status (protocol.ERRORS)."""

    def __init__(self, error_type: ErrorType, message: str, param: str | None = None) -> None:
        super().__init__(status_code=ERRORS[error_type].http_status, detail=message)
        self.error_type = error_type
        self.param = param


def error_body(message: str, code: ErrorType, param: str | None = None) -> dict[str, Any]:
    """OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = "invalid_request_error" if code is not ErrorType.INTERNAL_ERROR else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code.value}}


async def openai_http_error(request: Request, exc: Exception) -> Response:
    """HTTP errors under /v1 in OpenAI's shape (its client reads the message from there)."""
    # Starlette's own class: the router raises it for an unknown route, not FastAPI's subclass.
    assert isinstance(exc, StarletteHTTPException)
    if not request.url.path.startswith("/v1/"):
        return await http_exception_handler(request, exc)
    # Anything but an ApiError is the framework's own answer (no such route, a wrong method): the caller's.
    code = exc.error_type if isinstance(exc, ApiError) else ErrorType.BAD_REQUEST
    request.app.state.runtime.metrics.errors.labels(code.value).inc()
    return JSONResponse(
        error_body(str(exc.detail), code, getattr(exc, "param", None)),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def stream_error_response(request: Request, exc: Exception) -> Response:
    """A StreamError from an HTTP route (the key, its address, a quota) with its type's status: in OpenAI's
    shape under /v1, elsewhere as the error frame a stream would get."""
    assert isinstance(exc, StreamError)
    if not request.url.path.startswith("/v1/"):
        frame = exc.to_frame().model_dump(mode="json", exclude_none=True)
        return JSONResponse(frame, status_code=exc.http_status)
    request.app.state.runtime.metrics.errors.labels(exc.error_type.value).inc()
    headers = {"WWW-Authenticate": "Bearer"} if exc.error_type is ErrorType.AUTH_FAILED else None
    return JSONResponse(error_body(exc.message, exc.error_type), status_code=exc.http_status, headers=headers)


async def openai_validation_error(request: Request, exc: Exception) -> Response:
    """A missing or malformed form field under /v1: 400 with the field named (OpenAI answers 400)."""
    assert isinstance(exc, RequestValidationError)
    if not request.url.path.startswith("/v1/"):
        return await request_validation_exception_handler(request, exc)
    first = exc.errors()[0]
    field = str(first["loc"][-1]) if first.get("loc") else None
    request.app.state.runtime.metrics.errors.labels(ErrorType.BAD_REQUEST.value).inc()
    body = error_body(f"{field}: {first['msg']}", ErrorType.BAD_REQUEST, field)
    return JSONResponse(body, status_code=ERRORS[ErrorType.BAD_REQUEST].http_status)


async def _engine(runtime: Runtime, model: str, language: str, task: str) -> Engine:
    """The engine for the form's ``model``; a fallback is logged, as OpenAI's answer has no place for it."""
    try:
        choice = await runtime.choose_engine(*resolve_model(model), language, task)
    except UnknownModel as exc:
        raise ApiError(ErrorType.MODEL_NOT_FOUND, str(exc), "model") from None
    except UnsupportedLanguage as exc:
        raise ApiError(ErrorType.BAD_REQUEST, str(exc), "language") from None
    except EngineUnavailable as exc:
        raise ApiError(ErrorType.MODEL_UNAVAILABLE, str(exc)) from None
    if choice.fallback_reason is not None:
        log.warning(choice.fallback_reason, extra={"event": "engine_fallback", "engine": choice.engine.name})
    return choice.engine


def _undecodable(exc: Exception) -> ApiError:
    log.info("undecodable upload", extra={"event": "bad_file", "reason": type(exc).__name__})
    message = f"could not decode the file as audio (supported: {SUPPORTED_FORMATS})"
    return ApiError(ErrorType.INVALID_AUDIO, message, "file")


def file_too_large(limit: int) -> ApiError:
    return ApiError(ErrorType.FILE_TOO_LARGE, f"the file is larger than the limit of {limit} bytes", "file")


class ClientGone(Exception):
    """The client of an upload disconnected: its file is not worked on any further."""


class FileBudget:
    """What one file may use of its key's minutes and of ``max_upload_seconds``, and what it has used.

    A file is checked before it is charged: first from its header (refused before any decoding), then as
    it decodes, since a header may lie: each decoded piece is charged only if it fits, and decoding stops
    at the first that does not. A refusal leaves the day's usage as it was; a file that fails once
    charged (engine error, client gone, shutdown) gets back what was not transcribed.
    """

    def __init__(self, lease: StreamLease, max_seconds: float) -> None:
        self._lease = lease
        self._max_seconds = max_seconds
        self.decoded = 0.0
        self.transcribed = 0.0
        self._charged = 0.0
        self._refused = False

    async def check_declared(self, declared: float | None) -> None:
        """Refuse, before decoding, a file whose header says it is too long."""
        remaining = await self._lease.remaining_seconds()
        if declared is None:
            return
        if declared > self._max_seconds:
            raise self._too_long()
        if remaining is not None and declared > remaining:
            message = (
                f"the file holds {declared:.1f} s of audio; {remaining:.1f} s of today's quota are left "
                "(it resets at 00:00 UTC)"
            )
            raise quota_exceeded(Quota.DAILY_MINUTES, message)

    async def take(self, seconds: float) -> None:
        """Charge one decoded piece, or refuse the file (nothing of it charged)."""
        self.decoded += seconds
        try:
            if self.decoded > self._max_seconds:
                raise self._too_long()
            await self._lease.charge_if_fits(seconds)
        except (StreamError, ApiError):
            self._refused = True
            raise
        self._charged += seconds

    def done_until(self, seconds: float) -> None:
        """The file is transcribed up to ``seconds``."""
        self.transcribed = seconds

    async def give_back(self) -> None:
        """After a failure: refund what was charged and not transcribed (all of it for a refusal)."""
        keep = 0.0 if self._refused else min(self.transcribed, self._charged)
        if self._charged > keep:
            await self._lease.refund(self._charged - keep)

    def _too_long(self) -> ApiError:
        message = f"the file is longer than the limit of {self._max_seconds:g} seconds of audio"
        return ApiError(ErrorType.FILE_TOO_LARGE, message, "file")


async def _declared_seconds(runtime: Runtime, upload: UploadFile) -> float | None:
    try:
        return await runtime.run_file_work(declared_seconds, upload.file)
    except Exception as exc:
        raise _undecodable(exc) from None


async def _charged_chunks(
    request: Request, runtime: Runtime, upload: UploadFile, rate: int, budget: FileBudget
) -> AsyncGenerator[np.ndarray, None]:
    """The file's audio piece by piece, decoded on the file threads, each charged before it is used;
    stops when the client has gone."""
    chunks = iter_audio_file(upload.file, rate)
    try:
        while (chunk := await runtime.run_file_work(next, chunks, None)) is not None:
            if await request.is_disconnected():
                raise ClientGone
            await budget.take(len(chunk) / rate)
            yield chunk
    finally:
        # After a cancel the piece being decoded may still run on its thread: then it closes when collected.
        with contextlib.suppress(ValueError):
            chunks.close()


async def _transcribe_upload(
    request: Request,
    principal: Principal,
    upload: UploadFile,
    model: str,
    options: FileOptions,
    response_format: ResponseFormat,
    granularities: list[str],
) -> Response:
    runtime: Runtime = request.app.state.runtime
    settings = runtime.settings
    if upload.size is not None and upload.size > settings.max_upload_bytes:
        raise file_too_large(settings.max_upload_bytes)
    engine = await _engine(runtime, model, options.language, options.task)
    diarizer = await runtime.diarizer() if options.diarization else None
    try:  # a stream slot, like a stream's (same quotas; a key whose day is used up is refused)
        lease = await runtime.access.quotas.open_stream(principal.user_id, principal.limits)
    except StreamError as error:
        _count_refusal(runtime, error)
        raise
    budget = FileBudget(lease, settings.max_upload_seconds)
    try:
        await budget.check_declared(await _declared_seconds(runtime, upload))
        pieces, language = await _transcribe(request, runtime, engine, upload, options, budget, diarizer)
    except StreamError as error:
        _count_refusal(runtime, error)
        await budget.give_back()
        raise
    except ClientGone:
        await budget.give_back()
        log.info("client gone before its file was transcribed", extra={"event": "file_abandoned"})
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    except BaseException:
        await budget.give_back()
        raise
    finally:
        await lease.close()
    if budget.decoded <= 0:
        raise ApiError(ErrorType.INVALID_AUDIO, "the file contains no audio", "file")
    duration = budget.decoded
    runtime.metrics.audio_seconds.labels("file").inc(duration)
    log.info(
        "file transcribed",
        extra={
            "event": "file_transcribed",
            "engine": engine.name,
            "task": options.task,
            "audio_seconds": round(duration, 2),
            "pieces": len(pieces),
        },
    )
    return _respond(pieces, response_format, granularities, options, language, duration)


def _count_refusal(runtime: Runtime, error: StreamError) -> None:
    if error.error_type is ErrorType.QUOTA_EXCEEDED:
        runtime.metrics.quota_rejections.labels(error.quota or "unknown").inc()


async def _transcribe(
    request: Request,
    runtime: Runtime,
    engine: Engine,
    upload: UploadFile,
    options: FileOptions,
    budget: FileBudget,
    diarizer: Diarizer | None,
) -> tuple[list[TimedText], str]:
    """The file's pieces of text and their language; the budget follows what is decoded and transcribed."""
    vad = turn_vad(runtime.settings.vad) if diarizer else runtime.settings.vad
    rate = engine.sample_rate
    segmenter = Segmenter(runtime.vad, vad, runtime.settings.streaming.max_segment_seconds, rate)
    scheduler = runtime.scheduler(engine)
    languages: list[str] = []

    async def decode(window: AudioWindow) -> Transcript:
        if await request.is_disconnected():
            raise ClientGone
        try:
            transcript = await scheduler.submit(window, Priority.FINAL)
        except Exception:
            log.exception("engine failure on a file")
            raise ApiError(ErrorType.INTERNAL_ERROR, "the speech engine failed") from None
        languages.append(transcript.language)
        return transcript

    async def label(samples: np.ndarray) -> SpeakerLabel | None:
        assert diarizer is not None
        return await runtime.run_file_work(diarizer.label, samples)

    try:
        async with (
            aclosing(_charged_chunks(request, runtime, upload, engine.sample_rate, budget)) as chunks,
            aclosing(file_utterances_async(chunks, segmenter, runtime.run_file_work)) as utterances,
        ):
            pieces = await transcribe_file_async(
                utterances,
                decode,
                options,
                rate=engine.sample_rate,
                progress=budget.done_until,
                label=label if diarizer else None,
            )
    except (ValueError, OSError, av.error.FFmpegError) as exc:
        raise _undecodable(exc) from None
    return pieces, languages[0] if languages else options.language


def _respond(
    pieces: list[TimedText],
    response_format: ResponseFormat,
    granularities: list[str],
    options: FileOptions,
    language: str,
    duration: float,
) -> Response:
    text = " ".join(p.text for p in pieces)
    if response_format == "text":
        return PlainTextResponse(text + "\n")
    if response_format in ("srt", "vtt"):
        return PlainTextResponse(render(pieces, response_format))
    if response_format == "json":
        return JSONResponse({"text": text})
    body: dict[str, Any] = {
        "task": options.task,
        "language": language,
        "duration": round(duration, 3),
        "text": text,
    }
    if "segment" in granularities or not granularities:
        # Whisper's per-segment statistics (avg_logprob, ...) are not kept: only what is known is sent.
        body["segments"] = [
            {
                "id": index,
                "seek": round(piece.start * 100),
                "start": round(piece.start, 3),
                "end": round(piece.end, 3),
                "text": piece.text,
                "tokens": [],
                "temperature": options.temperature or 0.0,
            }
            | _speaker_fields(piece)
            for index, piece in enumerate(pieces)
        ]
    if "word" in granularities:
        body["words"] = [
            {"word": w.text.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            for piece in pieces
            for w in piece.words
        ]
    return JSONResponse(body)


def _speaker_fields(piece: TimedText) -> dict[str, Any]:
    """A diarized segment's ``speaker`` (its majority one) and, when it spans a change, ``speakers``."""
    if piece.speaker is None:
        return {}
    if len(piece.speakers) > 1:
        return {"speaker": piece.speaker, "speakers": list(piece.speakers)}
    return {"speaker": piece.speaker}


def _temperature(value: float) -> float | None:
    # OpenAI: 0 means "start greedy and raise the temperature when the text looks wrong", the default.
    return value if value > 0 else None


@router.post("/audio/transcriptions")
async def create_transcription(
    request: Request,
    principal: Annotated[Principal, Depends(require_principal)],
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form()] = "whisper-1",
    language: Annotated[str | None, Form(min_length=2, max_length=8)] = None,
    prompt: Annotated[str | None, Form(max_length=2000)] = None,
    response_format: Annotated[ResponseFormat, Form()] = "json",
    temperature: Annotated[float, Form(ge=0, le=1)] = 0.0,
    timestamp_granularities: Annotated[
        list[Literal["segment", "word"]], Form(alias="timestamp_granularities[]")
    ] = [],  # noqa: B006 - FastAPI copies defaults
    diarization: Annotated[bool, Form()] = False,
) -> Response:
    """Speech in ``file`` as text in its own language (English when ``language`` is not given);
    ``diarization`` (not OpenAI's) labels each segment with its speaker."""
    options = FileOptions(
        language=(language or "en").strip().lower(),
        prompt=prompt or None,
        word_timestamps=response_format == "verbose_json" and "word" in timestamp_granularities,
        temperature=_temperature(temperature),
        prompt_chars=request.app.state.runtime.settings.streaming.prompt_chars,
        diarization=diarization,
    )
    return await _transcribe_upload(
        request, principal, file, model, options, response_format, list(timestamp_granularities)
    )


@router.post("/audio/translations")
async def create_translation(
    request: Request,
    principal: Annotated[Principal, Depends(require_principal)],
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form()] = "whisper-1",
    prompt: Annotated[str | None, Form(max_length=2000)] = None,
    response_format: Annotated[ResponseFormat, Form()] = "json",
    temperature: Annotated[float, Form(ge=0, le=1)] = 0.0,
) -> Response:
    """Speech in ``file`` (any language Whisper knows, detected) as English text."""
    options = FileOptions(
        language="en",
        task="translate",
        prompt=prompt or None,
        temperature=_temperature(temperature),
        prompt_chars=request.app.state.runtime.settings.streaming.prompt_chars,
    )
    return await _transcribe_upload(request, principal, file, model, options, response_format, [])


@router.get("/models")
async def list_models(
    request: Request, principal: Annotated[Principal, Depends(require_principal)]
) -> dict[str, Any]:
    """``whisper-1`` (OpenAI's name, served by this server's Whisper models) and every available engine."""
    runtime: Runtime = request.app.state.runtime
    names = ["whisper-1"]
    names += [f"{s.model}-{s.variant}" for s in runtime.registry.status() if s.available]
    names += [engine.name for engine in runtime.registry.loaded()]
    unique = list(dict.fromkeys(names))
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "streamscribe"} for name in unique
        ],
    }
