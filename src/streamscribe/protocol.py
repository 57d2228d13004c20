"""The WebSocket wire protocol: every frame as a pydantic model, the error types and close codes.

Existing clients speak this protocol, so field names, defaults and aliases are part of the contract.

Errors: each has an ``ErrorType``, sent as the ``error_type`` of an error frame and as the ``code`` of an
OpenAI error body. ``ERRORS`` gives each type its close code (when it ends a stream) and its HTTP status.
A StreamError carries one; its two subclasses are the only places where the moment of the error, not its
type, picks the close code::

    StreamError
    ├── the session goes on: an error frame with "fatal": false
    │   ├── bad_request          a message the server cannot use (bad JSON, unknown type, second config)
    │   └── invalid_audio        a bad audio frame (base64, byte count, NaN, over the size limit, not Opus)
    ├── the session ends: an error frame with "fatal": true, then the type's close code
    │   ├── auth_failed          missing, wrong, revoked or expired key
    │   ├── forbidden            a key that may not stream
    │   │   └── AddressRefused   the address is not on the allowlist: 1008, told apart from a key's 4403
    │   ├── rate_limited         too many connection attempts
    │   ├── quota_exceeded       daily minutes or concurrent streams (``quota`` names which)
    │   ├── unavailable          the shared quota store is unreachable (fail_closed)
    │   ├── server_busy          at the stream limit, or the engine is too far behind
    │   ├── model_unavailable    the engine asked for is not here, and no fallback
    │   ├── timeout              no message for the idle timeout
    │   ├── internal_error       the engine failed, or a bug
    │   └── ConfigRefused        the config is missing, late (timeout) or invalid (bad_request; a binary
    │                            frame before it, too): 4400 whatever the type, since nothing can follow
    │                            a session that did not start
    └── the file API only (HTTP)
        ├── model_not_found      an unknown model name
        └── file_too_large       an upload over the size limit
"""

from __future__ import annotations

import time
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from streamscribe.engines import SAMPLE_RATE


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # the server is shutting down, or the client sent nothing for the idle timeout
    POLICY_VIOLATION = 1008  # the client's address is not on the allowlist
    ENGINE_FAILURE = 1011
    TRY_AGAIN_LATER = 1013  # server busy, or the shared quota store is unreachable (fail_closed)
    QUOTA_EXCEEDED = 4003
    PROTOCOL_ERROR = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403  # a valid key that may not use this endpoint
    RATE_LIMITED = 4429


class ErrorType(StrEnum):
    BAD_REQUEST = "bad_request"
    INVALID_AUDIO = "invalid_audio"
    AUTH_FAILED = "auth_failed"
    MODEL_UNAVAILABLE = "model_unavailable"
    TIMEOUT = "timeout"
    SERVER_BUSY = "server_busy"
    INTERNAL_ERROR = "internal_error"
    FORBIDDEN = "forbidden"
    QUOTA_EXCEEDED = "quota_exceeded"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    MODEL_NOT_FOUND = "model_not_found"
    FILE_TOO_LARGE = "file_too_large"


class ErrorOutcome(NamedTuple):
    """What an error type leads to: the close code of the stream it ends (None: the session goes on), and
    the HTTP status of a request it refuses."""

    close_code: CloseCode | None
    http_status: int


ERRORS: dict[ErrorType, ErrorOutcome] = {
    ErrorType.BAD_REQUEST: ErrorOutcome(None, 400),
    ErrorType.INVALID_AUDIO: ErrorOutcome(None, 400),
    ErrorType.AUTH_FAILED: ErrorOutcome(CloseCode.UNAUTHORIZED, 401),
    ErrorType.FORBIDDEN: ErrorOutcome(CloseCode.FORBIDDEN, 403),
    ErrorType.RATE_LIMITED: ErrorOutcome(CloseCode.RATE_LIMITED, 429),
    ErrorType.QUOTA_EXCEEDED: ErrorOutcome(CloseCode.QUOTA_EXCEEDED, 429),
    ErrorType.UNAVAILABLE: ErrorOutcome(CloseCode.TRY_AGAIN_LATER, 503),
    ErrorType.SERVER_BUSY: ErrorOutcome(CloseCode.TRY_AGAIN_LATER, 503),
    # 400, not 503: OpenAI's clients retry a 503, and asking again for a missing engine cannot help.
    ErrorType.MODEL_UNAVAILABLE: ErrorOutcome(CloseCode.ENGINE_FAILURE, 400),
    ErrorType.TIMEOUT: ErrorOutcome(CloseCode.GOING_AWAY, 408),
    ErrorType.INTERNAL_ERROR: ErrorOutcome(CloseCode.ENGINE_FAILURE, 500),
    ErrorType.MODEL_NOT_FOUND: ErrorOutcome(None, 400),
    ErrorType.FILE_TOO_LARGE: ErrorOutcome(None, 413),
}


class Quota(StrEnum):
    """Which quota a ``quota_exceeded`` error is about."""

    DAILY_MINUTES = "daily_minutes"
    CONCURRENT_STREAMS = "concurrent_streams"


class StreamError(Exception):
    """An error the client is told about; its type gives the close code and HTTP status (``ERRORS``)."""

    def __init__(self, error_type: ErrorType, message: str, *, quota: Quota | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.quota = quota

    @property
    def close_code(self) -> CloseCode | None:
        """The close code of the session this error ends; None: the session goes on."""
        return ERRORS[self.error_type].close_code

    @property
    def http_status(self) -> int:
        return ERRORS[self.error_type].http_status

    def to_frame(self) -> ErrorFrame:
        return ErrorFrame(
            message=self.message,
            error_type=self.error_type,
            quota=self.quota,
            fatal=self.close_code is not None,
        )


class ConfigRefused(StreamError):
    """The first message was not a usable config, or did not come in time: 4400, whatever the type."""

    @property
    def close_code(self) -> CloseCode:
        return CloseCode.PROTOCOL_ERROR


class AddressRefused(StreamError):
    """``forbidden`` because of the client's address, not its key: 1008, which clients tell from 4403."""

    def __init__(self) -> None:
        super().__init__(ErrorType.FORBIDDEN, "connections from this address are not allowed")

    @property
    def close_code(self) -> CloseCode:
        return CloseCode.POLICY_VIOLATION


def quota_exceeded(quota: Quota, message: str) -> StreamError:
    """Over a quota: the error frame names the quota."""
    return StreamError(ErrorType.QUOTA_EXCEEDED, message, quota=quota)


Variant = Literal["standard", "onnx", "mlx"]


class AudioFormat(StrEnum):
    """How a stream's audio frames hold samples (JSON ``audio`` frames in base64, binary frames as is)."""

    FLOAT32 = "float32"  # little-endian 32-bit float samples in [-1, 1]
    PCM16 = "pcm16"  # little-endian signed 16-bit samples
    MULAW = "mulaw"  # G.711 mu-law, one byte a sample (telephone audio, 8 kHz unless said otherwise)
    ALAW = "alaw"  # G.711 A-law, one byte a sample
    OPUS = "opus"  # Ogg or WebM pages of Opus packets, as a browser's MediaRecorder writes them


G711_FORMATS = frozenset({AudioFormat.MULAW, AudioFormat.ALAW})
G711_SAMPLE_RATE = 8000

MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000
MAX_PROMPT_CHARS = 1000


class _ClientFrame(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ConfigMessage(_ClientFrame):
    """The first frame of a session. Every field is optional."""

    type: Literal["config"]
    model: str | None = None  # any name engines.registry.resolve_model knows; None: the server's default
    variant: Variant = Field("standard", validation_alias=AliasChoices("variant", "model_variant"))
    sample_rate: int = Field(SAMPLE_RATE, ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE)
    language: str = Field("en", min_length=2, max_length=8)
    # Accepted for compatibility with the chunked design this server replaces; the VAD policy segments
    # audio itself, so these only bound the buffer (see docs in README "Protocol").
    chunk_duration: float = Field(2.0, gt=0, le=30)
    overlap_duration: float = Field(0.5, ge=0, le=10)
    max_buffer_duration: float = Field(30.0, ge=3, le=120)
    enable_partial: bool = True
    partial_interval: float = Field(0.5, ge=0.1, le=10)
    audio_format: AudioFormat = AudioFormat.FLOAT32
    # Streaming extras, off unless asked for.
    word_timestamps: bool = False
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    hotwords: str | None = Field(None, max_length=MAX_PROMPT_CHARS)

    @model_validator(mode="after")
    def _telephone_rate(self) -> ConfigMessage:
        """G.711 audio is 8 kHz unless the config gives a rate (any allowed rate works: it is a sample
        encoding, and some systems send it wideband). Opus streams carry their own rate."""
        if self.audio_format in G711_FORMATS and "sample_rate" not in self.model_fields_set:
            self.sample_rate = G711_SAMPLE_RATE
        return self

    @field_validator("hotwords", mode="before")
    @classmethod
    def _join_hotwords(cls, value: Any) -> Any:
        """Accept a list of words or phrases as well as one string."""
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return ", ".join(item.strip() for item in value if item.strip())
        return value

    @field_validator("prompt", "hotwords")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("language")
    @classmethod
    def _lowercase_language(cls, value: str) -> str:
        return value.strip().lower()


class AudioMessage(_ClientFrame):
    type: Literal["audio"]
    data: str


class CommitMessage(_ClientFrame):
    type: Literal["commit"]


class ResetMessage(_ClientFrame):
    type: Literal["reset"]


class StopMessage(_ClientFrame):
    type: Literal["stop"]


class AuthMessage(_ClientFrame):
    """The key, sent as the first message when it is not in the URL or a header."""

    type: Literal["auth"]
    token: str = Field(min_length=1, max_length=512)


class PingMessage(_ClientFrame):
    """An application-level keep-alive, answered by a pong (allowed at any time, even before config)."""

    type: Literal["ping"]


ClientMessage = Annotated[
    ConfigMessage | AudioMessage | CommitMessage | ResetMessage | StopMessage | AuthMessage | PingMessage,
    Field(discriminator="type"),
]
_client_message_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


def parse_client_message(raw: str | bytes) -> ClientMessage:
    """Parse one text frame; raises StreamError(bad_request) with a readable reason."""
    try:
        return _client_message_adapter.validate_json(raw)
    except ValidationError as exc:
        raise StreamError(ErrorType.BAD_REQUEST, _describe_validation_error(exc)) from None


def _describe_validation_error(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return "message is not valid JSON"
    if first["type"] == "union_tag_invalid":
        return (
            f"unknown message type {first['input'].get('type')!r}"
            if isinstance(first["input"], dict)
            else ("unknown message type")
        )
    if first["type"] == "union_tag_not_found":
        return "message has no 'type' field"
    location = ".".join(str(part) for part in first["loc"][1:]) or "message"
    return f"{location}: {first['msg']}"


class ServerFrame(BaseModel):
    timestamp: float = Field(default_factory=time.time)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


class StatusFrame(ServerFrame):
    type: Literal["status"] = "status"
    state: Literal["configured", "ready", "reset"]
    model: str | None = None
    variant: str | None = None
    language: str | None = None


class WordTiming(BaseModel):
    """One word of a final, when the config asked for ``word_timestamps`` (seconds of stream audio)."""

    word: str
    start: float
    end: float
    probability: float


class TranscriptFrame(ServerFrame):
    """A partial (tentative, replaced by the next one) or a final (never revised) segment."""

    type: Literal["partial", "final"]
    text: str
    is_final: bool
    model: str
    segment_id: int
    start: float
    end: float
    language: str
    words: list[WordTiming] | None = None


class FullTranscriptFrame(ServerFrame):
    type: Literal["full_transcript"] = "full_transcript"
    text: str


class WarningFrame(ServerFrame):
    type: Literal["warning"] = "warning"
    fallback: bool
    original_model: str
    active_model: str
    message: str


class ErrorFrame(ServerFrame):
    """An error; ``fatal``: the server closes the session next (with the type's close code)."""

    type: Literal["error"] = "error"
    message: str
    error_type: ErrorType
    fatal: bool
    quota: Quota | None = None


class StreamLimitsReport(BaseModel):
    """``GET /api/v1/audio/stream/limits``: a key's limits and today's usage (UTC day)."""

    class Limits(BaseModel):
        daily_minutes: float | None
        concurrent_streams: int | None
        max_frame_bytes: int

    user_id: str
    tier: str
    limits: Limits
    used_today_minutes: float
    remaining_minutes: float | None
    active_streams: int
    can_start_stream: bool


class PongFrame(ServerFrame):
    type: Literal["pong"] = "pong"
