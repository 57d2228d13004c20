"""The WebSocket wire protocol: every frame as a pydantic model, the error types and close codes.

Existing clients speak this protocol, so field names, defaults and aliases are part of the contract.
"""

from __future__ import annotations

import time
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from streamscribe.engines import SAMPLE_RATE


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
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


class Quota(StrEnum):
    """Which quota a ``quota_exceeded`` error is about."""

    DAILY_MINUTES = "daily_minutes"
    CONCURRENT_STREAMS = "concurrent_streams"


class StreamError(Exception):
    """An error the client is told about; ``close_code`` ends the session, ``None`` lets it continue."""

    def __init__(
        self,
        error_type: ErrorType,
        message: str,
        close_code: CloseCode | None = None,
        quota: Quota | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.close_code = close_code
        self.quota = quota

    def to_frame(self) -> ErrorFrame:
        return ErrorFrame(message=self.message, error_type=self.error_type, quota=self.quota)


def quota_exceeded(quota: Quota, message: str) -> StreamError:
    """Over a quota: the error frame names the quota, and the session closes with 4003."""
    return StreamError(ErrorType.QUOTA_EXCEEDED, message, CloseCode.QUOTA_EXCEEDED, quota)


Variant = Literal["standard", "onnx", "mlx"]

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
    audio_format: Literal["float32", "pcm16"] = "float32"
    # Streaming extras, off unless asked for.
    word_timestamps: bool = False
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    hotwords: str | None = Field(None, max_length=MAX_PROMPT_CHARS)

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
    type: Literal["error"] = "error"
    message: str
    error_type: ErrorType
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
