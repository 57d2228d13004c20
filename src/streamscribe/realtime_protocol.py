"""OpenAI's Realtime API, transcription sessions: every event this server reads or writes, as a pydantic
model shaped after the ``openai`` package's ``types/realtime`` (the field names are OpenAI's contract).

Client events: ``session.update`` (a ``transcription`` session), ``input_audio_buffer.append``,
``.commit``, ``.clear``. Server events: ``session.created``, ``session.updated``,
``input_audio_buffer.speech_started``, ``.speech_stopped``, ``.committed``, ``.cleared``,
``conversation.item.input_audio_transcription.delta``, ``.completed``, and ``error``.

Errors are the seed protocol's ``StreamError`` (its type gives the close code, ``protocol.ERRORS``), sent
as an ``error`` event: ``{"type": "error", "error": {"type", "code", "message", "param", "event_id"}}``;
``RealtimeRefusal`` adds the parameter at fault and the client event's id.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from streamscribe.protocol import MAX_PROMPT_CHARS, ErrorType, StreamError

OPENAI_PCM_RATE = 24000  # audio/pcm: 16-bit little-endian mono at 24 kHz, the only rate OpenAI takes


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (``event_…``, ``item_…``, ``sess_…``)."""
    return f"{prefix}_{secrets.token_hex(10)}"


class RealtimeRefusal(StreamError):
    """A StreamError about one client event: ``param`` names the field at fault, ``code`` overrides the
    error type's name where OpenAI has a code of its own."""

    def __init__(
        self,
        error_type: ErrorType,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        event_id: str | None = None,
    ) -> None:
        super().__init__(error_type, message)
        self.param = param
        self.code = code
        self.event_id = event_id


# Client events ------------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AudioPcm(_Lenient):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[24000] = 24000  # OPENAI_PCM_RATE


class AudioPcmu(_Lenient):
    type: Literal["audio/pcmu"] = "audio/pcmu"


class AudioPcma(_Lenient):
    type: Literal["audio/pcma"] = "audio/pcma"


RealtimeAudioFormat = Annotated[AudioPcm | AudioPcmu | AudioPcma, Field(discriminator="type")]


class AudioTranscription(_Lenient):
    model: str | None = None
    language: str | None = Field(None, min_length=2, max_length=8)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    keywords: list[str] | None = None


class ServerVad(_Lenient):
    """Server VAD: the threshold, padding and silence map onto this server's VAD settings (README)."""

    type: Literal["server_vad"] = "server_vad"
    threshold: float | None = Field(None, gt=0.0, lt=1.0)
    prefix_padding_ms: int | None = Field(None, ge=0, le=1000)
    silence_duration_ms: int | None = Field(None, ge=100, le=5000)


class SemanticVad(_Lenient):
    type: Literal["semantic_vad"]


class TranscriptionAudioInput(_Lenient):
    format: RealtimeAudioFormat | None = None
    transcription: AudioTranscription | None = None
    turn_detection: Annotated[ServerVad | SemanticVad, Field(discriminator="type")] | None = None
    noise_reduction: dict[str, Any] | None = None


class TranscriptionAudio(_Lenient):
    input: TranscriptionAudioInput | None = None


class TranscriptionSession(_Lenient):
    """``session`` of a ``session.update``; which fields were sent matters (``model_fields_set``)."""

    type: Literal["transcription", "realtime"]
    audio: TranscriptionAudio | None = None
    include: list[str] | None = None


class _ClientEvent(_Lenient):
    event_id: str | None = None


class SessionUpdate(_ClientEvent):
    type: Literal["session.update"]
    session: TranscriptionSession


class InputAudioBufferAppend(_ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: str


class InputAudioBufferCommit(_ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class InputAudioBufferClear(_ClientEvent):
    type: Literal["input_audio_buffer.clear"]


ClientEvent = Annotated[
    SessionUpdate | InputAudioBufferAppend | InputAudioBufferCommit | InputAudioBufferClear,
    Field(discriminator="type"),
]
_client_event_adapter: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
# OpenAI's other client events: a conversation's, which a transcription session has no use for.
_CONVERSATION_EVENTS = ("conversation.", "response.", "output_audio_buffer.")


def parse_client_event(raw: str) -> ClientEvent:
    """One text frame as a client event; raises RealtimeRefusal(bad_request) naming what is wrong."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise RealtimeRefusal(ErrorType.BAD_REQUEST, "the event is not valid JSON") from None
    if not isinstance(data, dict):
        raise RealtimeRefusal(ErrorType.BAD_REQUEST, "an event is a JSON object with a 'type'")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    if not isinstance(kind, str):
        raise RealtimeRefusal(
            ErrorType.BAD_REQUEST, "the event has no 'type'", param="type", event_id=event_id
        )
    if kind.startswith(_CONVERSATION_EVENTS):
        message = f"{kind!r} is not part of a transcription session: this server transcribes only"
        raise RealtimeRefusal(ErrorType.BAD_REQUEST, message, param="type", event_id=event_id)
    try:
        return _client_event_adapter.validate_python(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "union_tag_invalid":
            message = f"unknown event type {kind!r}"
            raise RealtimeRefusal(ErrorType.BAD_REQUEST, message, param="type", event_id=event_id) from None
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        raise RealtimeRefusal(ErrorType.BAD_REQUEST, message, param=param, event_id=event_id) from None


# Server events ------------------------------------------------------------------------------------------


class _ServerEvent(BaseModel):
    event_id: str = Field(default_factory=lambda: new_id("event"))

    def to_json(self) -> str:
        return self.model_dump_json()


class TurnDetection(BaseModel):
    type: Literal["server_vad"] = "server_vad"
    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int


class TranscriptionSettings(BaseModel):
    model: str
    language: str
    prompt: str | None = None
    keywords: list[str] | None = None


class SessionInput(BaseModel):
    format: AudioPcm | AudioPcmu | AudioPcma
    transcription: TranscriptionSettings
    turn_detection: TurnDetection | None
    noise_reduction: None = None  # not done here


class SessionAudio(BaseModel):
    input: SessionInput


class SessionDescription(BaseModel):
    """The effective configuration, as ``session.created`` and ``session.updated`` report it."""

    type: Literal["transcription"] = "transcription"
    id: str
    object: Literal["realtime.transcription_session"] = "realtime.transcription_session"
    audio: SessionAudio
    include: None = None


class SessionCreated(_ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: SessionDescription


class SessionUpdated(_ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: SessionDescription


class SpeechStarted(_ServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class SpeechStopped(_ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


class Committed(_ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None


class Cleared(_ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class TranscriptionDelta(_ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.delta"] = (
        "conversation.item.input_audio_transcription.delta"
    )
    item_id: str
    content_index: int = 0
    delta: str


class DurationUsage(BaseModel):
    type: Literal["duration"] = "duration"
    seconds: float


class TranscriptionCompleted(_ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.completed"] = (
        "conversation.item.input_audio_transcription.completed"
    )
    item_id: str
    content_index: int = 0
    transcript: str
    usage: DurationUsage


class RealtimeErrorDetail(BaseModel):
    type: Literal["invalid_request_error", "server_error"]
    code: str
    message: str
    param: str | None = None
    event_id: str | None = None


class ErrorEvent(_ServerEvent):
    type: Literal["error"] = "error"
    error: RealtimeErrorDetail


def error_event(error: StreamError, event_id: str | None = None) -> ErrorEvent:
    """``error`` as OpenAI's error event: the client's mistake (4xx) or the server's (5xx)."""
    kind: Literal["invalid_request_error", "server_error"] = (
        "server_error" if error.http_status >= 500 else "invalid_request_error"
    )
    code, param = error.error_type.value, None
    if isinstance(error, RealtimeRefusal):
        code, param, event_id = error.code or code, error.param, error.event_id or event_id
    elif error.quota is not None:
        param = error.quota.value  # which quota: daily_minutes or concurrent_streams
    detail = RealtimeErrorDetail(type=kind, code=code, message=error.message, param=param, event_id=event_id)
    return ErrorEvent(error=detail)
