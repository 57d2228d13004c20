"""All server settings in one object, read from STREAMSCRIBE_* variables and an optional TOML file.

Precedence, highest first: command-line flags, environment variables, the config file, defaults.
Nested groups use a double underscore: ``STREAMSCRIBE_VAD__MIN_SILENCE_MS=400``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "STREAMSCRIBE_"
CONFIG_FILE_VARIABLE = "STREAMSCRIBE_CONFIG_FILE"
_config_file: ContextVar[Path | None] = ContextVar("config_file", default=None)


class WhisperSettings(BaseModel):
    """faster-whisper (CTranslate2), the embedded default engine."""

    english_model: str = Field(
        "tiny.en",
        description="Bundled model name (tiny.en, base), a local CTranslate2 Whisper folder, or a model on "
        "the Hugging Face Hub (faster-whisper's small.en, large-v3-turbo, ..., or a repo id), downloaded "
        "once into the Hugging Face cache when HF_HUB_OFFLINE=0.",
    )
    multilingual_model: str = Field(
        "base",
        description="Model used for every language other than English (bundled name, folder or hub model, "
        "as english_model).",
    )
    compute_type: str = Field(
        "int8",
        description="CTranslate2 compute type on CPU: int8, int8_float16, float16, float32 "
        "(float16 on CUDA).",
    )
    beam_size: int = Field(5, ge=1, le=10, description="Beam size for final segments (partials use greedy).")
    busy_beam_size: int = Field(
        3,
        ge=1,
        le=10,
        description="Beam size for finals while the server is behind (several decoded together, without "
        "fallback); 1: greedy, which costs WER under load (measured: 3 gave beam_size's WER for greedy's "
        "CPU, 2 half of that gain).",
    )
    min_encoder_seconds: float = Field(
        13.0,
        ge=10.0,
        le=30.0,
        description="Encode short windows as this many seconds instead of Whisper's 30 s (about 5x less "
        "encoder time; measured on the dev clips: 12-15 s keep the WER, 10 s doubles it on long.wav).",
    )
    partial_encoder_seconds: float = Field(
        10.0,
        ge=5.0,
        le=30.0,
        description="The same for partials of short utterances: tentative text, re-decoded often, where "
        "speed matters more (finals keep min_encoder_seconds).",
    )


class VadOptions(BaseModel):
    """Silero VAD: where utterances start and end. Streams and files take this group as it is."""

    model_config = ConfigDict(frozen=True)

    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Speech probability that starts speech.")
    min_silence_ms: int = Field(500, ge=100, le=5000, description="Silence that ends an utterance (a final).")
    speech_pad_ms: int = Field(200, ge=0, le=1000, description="Audio kept before and after speech.")
    min_speech_ms: int = Field(250, ge=0, le=2000, description="Shorter bursts are ignored as noise.")
    pause_cut_ms: int = Field(
        6000,
        ge=0,
        le=30000,
        description="An utterance longer than this is closed at its longest short pause (a dip the VAD did "
        "not end it on), so speech without long pauses still gets a final every few seconds; 0: only "
        "max_segment_seconds cuts.",
    )
    max_gain_db: float = Field(
        40.0,
        ge=0.0,
        le=60.0,
        description="Quiet audio is raised by up to this much for the VAD only (the engine hears it as "
        "sent), so speech at -60 dBFS is still found; 0 turns this off.",
    )


class StreamingSettings(BaseModel):
    """How a live stream turns into partial and final text."""

    max_segment_seconds: float = Field(
        15.0, ge=3.0, le=30.0, description="An utterance longer than this is cut at its quietest moment."
    )
    max_backlog_seconds: float = Field(
        60.0,
        ge=5.0,
        description="Audio a stream may have waiting for decoding before the server stops reading its socket "
        "(backpressure: audio is delayed, never dropped).",
    )
    prompt_chars: int = Field(
        200, ge=0, le=1000, description="Characters of previous final text given to the engine as context."
    )
    config_timeout_seconds: float = Field(
        10.0, gt=0, description="Time allowed for the first config message."
    )
    overload_seconds: float = Field(
        3.0,
        gt=0,
        description="When a final has waited this long for the engine, new streams are refused (close 1013) "
        "until the server catches up.",
    )
    max_frame_bytes: int = Field(
        1_048_576, ge=1024, description="Largest decoded audio payload accepted in one frame."
    )
    max_audio_speed: float = Field(
        4.0,
        ge=0,
        description="Audio a stream may send, in times real time, once its burst is spent; a faster client "
        "is read more slowly (TCP backpressure), never cut off. 0: no limit.",
    )
    audio_burst_seconds: float = Field(
        30.0,
        ge=0,
        description="Seconds of audio a stream may send at once beyond max_audio_speed (at the start, or "
        "after it sent less for a while).",
    )
    max_messages_per_second: float = Field(
        100.0,
        ge=0,
        description="Frames of any kind a stream may send per second (a second's worth at once); faster "
        "clients are read more slowly. 0: no limit.",
    )
    max_bytes_per_second: int = Field(
        2 * 1_048_576,
        ge=0,
        description="Bytes of frames a stream may send per second, counted as received (a second's worth at "
        "once); faster clients are read more slowly. 0: no limit.",
    )
    permessage_deflate: bool = Field(
        False,
        description="Accept WebSocket compression. Off by default: it saves about a quarter of base64 audio, "
        "but the server inflates frames before it can pace them, and silence inflates about 1000 times.",
    )


class NemoSettings(BaseModel):
    """NVIDIA NeMo models: Parakeet (standard, ONNX, MLX) and Canary. Each needs its weights configured.
    The streaming Parakeet engine takes this group as it is."""

    parakeet_model: str | None = Field(
        None,
        description="Parakeet for the standard variant (NeMo, PyTorch): a local .nemo file (TDT, RNNT or "
        "CTC), or a model name such as nvidia/parakeet-tdt-0.6b-v2 when the machine can reach the model hub.",
    )
    parakeet_onnx_dir: Path | None = Field(
        None,
        description="Parakeet for the onnx variant: a folder with encoder-model.onnx, "
        "decoder_joint-model.onnx (CTC: model.onnx) and vocab.txt, as onnx-asr reads it "
        "(see docs/engines.md).",
    )
    parakeet_mlx_dir: Path | None = Field(
        None, description="Parakeet for the mlx variant: a folder with config.json and model.safetensors."
    )
    canary_model: str | None = Field(
        None,
        description="Canary (NeMo EncDecMultiTaskModel): a local .nemo file, or a model name such as "
        "nvidia/canary-1b when the machine can reach the model hub.",
    )
    native_streaming: bool = Field(
        True,
        description="Stream Parakeet (standard) through NeMo's own streaming pipeline, decoder state carried "
        "between chunks. If false, it re-decodes the growing utterance like Whisper.",
    )
    chunk_seconds: float = Field(
        0.64, gt=0.0, le=10.0, description="Audio per NeMo streaming step (buffered pipeline)."
    )
    left_context_seconds: float = Field(
        1.6, ge=0.0, le=30.0, description="Audio before each chunk that the buffered pipeline re-encodes."
    )
    right_context_seconds: float = Field(
        0.32, ge=0.0, le=10.0, description="Look-ahead after each chunk (adds this much latency)."
    )
    cache_aware_right_context: int | None = Field(
        None,
        description="For cache-aware (streaming-trained) models: encoder right context in frames, one of the "
        "lookaheads the model was trained with (0, 1, 6, 13 for NVIDIA's). Unset: the model's default.",
    )
    streams_per_step: int = Field(
        8, ge=1, le=256, description="Live streams decoded together in one NeMo streaming step (batch size)."
    )
    max_streams: int = Field(
        64, ge=1, description="Live NeMo streams at once (cache slots of cache-aware models)."
    )


class TierLimits(BaseModel):
    """What one tier may use. ``daily_minutes`` null means unlimited."""

    daily_minutes: float | None = Field(
        30.0, ge=0, description="Minutes of audio a day (UTC); null (the string 'null' in env) is unlimited."
    )
    concurrent_streams: int = Field(1, ge=0, description="Streams open at the same time.")


class FreeTier(TierLimits):
    pass


_DAILY_MINUTES = TierLimits.model_fields["daily_minutes"].description
_CONCURRENT_STREAMS = TierLimits.model_fields["concurrent_streams"].description


class StandardTier(TierLimits):
    daily_minutes: float | None = Field(300.0, ge=0, description=_DAILY_MINUTES)
    concurrent_streams: int = Field(3, ge=0, description=_CONCURRENT_STREAMS)


class PremiumTier(TierLimits):
    daily_minutes: float | None = Field(None, ge=0, description=_DAILY_MINUTES)
    concurrent_streams: int = Field(10, ge=0, description=_CONCURRENT_STREAMS)


class TierSettings(BaseModel):
    """Quota tiers of multi-user keys (each user has one tier)."""

    free: FreeTier = Field(default_factory=FreeTier)
    standard: StandardTier = Field(default_factory=StandardTier)
    premium: PremiumTier = Field(default_factory=PremiumTier)

    def limits(self, tier: str) -> TierLimits:
        """A tier's limits. A tier this server does not know (a database edited by hand, or by a newer
        release) gets the free tier's: the fewest, and no key is refused or fails for it."""
        return getattr(self, tier) if tier in TIERS else self.free


TIERS = ("free", "standard", "premium")


class AccessSettings(BaseModel):
    """Who may connect, how a key is presented, and how often connections may be attempted."""

    allow_query_token: bool = Field(
        True,
        description="Accept the key as ?token= in the URL. Turn off where proxies log URLs; clients then use "
        'the X-API-KEY or Authorization: Bearer header or a first {"type":"auth"} message.',
    )
    auth_message_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description='Time allowed for an {"type":"auth","token":...} message when no key came with the '
        "connection.",
    )
    ip_allowlist: list[str] = Field(
        default_factory=list,
        description="Addresses and CIDR ranges allowed to connect (JSON list); empty allows all. Others: "
        "close 1008.",
    )
    idle_timeout_seconds: float = Field(
        60.0, gt=0, description="A stream that sends no frame for this long is closed (1001)."
    )
    connections_per_minute_per_key: int = Field(
        60, ge=0, description="Connection attempts a key may make per minute (multi-user mode); 0: no limit."
    )
    connections_per_minute_per_ip: int = Field(
        120,
        ge=0,
        description="Connection attempts an address may make per minute (multi-user mode); 0: no limit.",
    )
    failed_auth_per_minute_per_ip: int = Field(
        30,
        ge=0,
        description="Wrong or missing keys an address may present per minute (HTTP and WebSocket, both "
        "modes); past it every attempt from the address, right key or not, gets rate_limited (429, 4429) "
        "for the rest of the minute. 0: no limit.",
    )


class SharedStoreSettings(BaseModel):
    """Redis, shared by replicas for active streams, minute counters and rate limits."""

    redis_url: str | None = Field(
        None, description="redis://host:port/db. Unset: counters live in this process (one replica only)."
    )
    on_failure: Literal["fail_closed", "fail_open"] = Field(
        "fail_closed",
        description="When Redis is unreachable: fail_closed refuses new streams (running ones finish); "
        "fail_open admits new streams within the allowance below, counted in this process.",
    )
    fail_open_streams: int = Field(
        1, ge=0, description="fail_open: streams a user may open on this replica while Redis is unreachable."
    )
    fail_open_minutes: float = Field(
        5.0,
        ge=0,
        description="fail_open: minutes a user may stream on this replica (per UTC day) while Redis is "
        "unreachable.",
    )
    stream_ttl_seconds: float = Field(
        30.0,
        gt=0,
        description="Lifetime of a stream's slot in Redis, refreshed while it streams (a crashed "
        "replica's slots free themselves after this). Every third of it, open streams re-check their key.",
    )
    timeout_seconds: float = Field(1.0, gt=0, description="Longest wait for one Redis command.")


class Settings(BaseSettings):
    """Every knob of a streamscribe server. Defaults work on a laptop with nothing configured."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_parse_none_str="null",
        extra="ignore",
        validate_default=True,
    )

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    wyoming_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Also serve speech-to-text over the Wyoming protocol (Home Assistant's voice "
        "assistants) on this TCP port. Unset: off. Wyoming has no keys: anyone who reaches the port may "
        "transcribe, so keep it on a trusted network.",
    )
    wyoming_host: str = Field(
        "127.0.0.1",
        description="Address the Wyoming port listens on: this machine only by default. Another address "
        "(e.g. 0.0.0.0 for Home Assistant on another host) exposes it, without keys, to that network; "
        "access.ip_allowlist still applies.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="The single user's API key, at least 16 characters (serve refuses a shorter one). When "
        "unset, a random key is generated and printed at start.",
    )
    auth_mode: Literal["single_user", "multi_user"] = Field(
        "single_user",
        description="single_user: one key (api_key). multi_user: keys and quotas from the database "
        "(streamscribe keys ...).",
    )
    data_dir: Path = Field(
        Path.home() / ".local" / "share" / "streamscribe",
        description="Where the SQLite key database and the generated key pepper live (multi-user mode).",
    )
    database_url: str | None = Field(
        None,
        description="sqlite:///PATH or postgresql://... (needs the postgres extra). Unset: "
        "sqlite in data_dir/streamscribe.db.",
    )
    key_pepper: SecretStr | None = Field(
        None,
        description="Server secret mixed into every key hash. Unset: generated once into "
        "data_dir/key_pepper. Required with PostgreSQL (replicas must share it).",
    )
    usage_flush_seconds: float = Field(
        5.0, gt=0, description="How often minutes charged in memory are written to the database."
    )
    default_model: Literal["whisper", "parakeet", "canary", "moonshine"] = Field(
        "whisper", description="Engine used when a config names none."
    )
    allow_fallback: bool = Field(
        True,
        description="When a requested engine is unavailable, use the default one and warn. If false, the "
        "session ends with an error (close 1011).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where engines run: cpu, cuda, or auto (CUDA when CTranslate2 sees a GPU)."
    )
    cpu_threads: int = Field(
        0, ge=0, description="Threads per engine call on CPU; 0 means cores divided by decode workers."
    )
    max_streams: int = Field(0, ge=0, description="Concurrent streams this server accepts; 0 means no limit.")
    decode_workers: int = Field(
        0,
        ge=0,
        le=16,
        description="Engine calls that may run at the same time; 0 means one per core, each single-threaded "
        "(the cheapest way to spend the cores on many small decodes).",
    )
    decode_batch: int = Field(
        2,
        ge=1,
        le=16,
        description="Most waiting decodes one engine call takes together (partials, and finals while the "
        "server is behind); Whisper decodes them as one CTranslate2 batch. Larger batches save CPU but "
        "hold a worker longer while finals wait (32 streams: p90 delay 1.7 s at 2, 2.1 s at 4). "
        "1 turns it off.",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "streamscribe",
        description="Where bundled models that ship in parts are assembled (once).",
    )
    preload: bool = Field(
        True,
        description="Load the default English model at start-up, then every configured NeMo-family engine "
        "(/readyz is 503 until they are loaded), not on first use.",
    )
    metrics_require_key: bool = Field(
        False,
        description="Require an API key (any scope) for /metrics; Prometheus then sends it as a bearer "
        "token. Off: keep /metrics on an internal network.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.")
    log_format: Literal["json", "text"] = Field(
        "json",
        description="json: one JSON object per line and event, with the request or connection id; "
        "text: human-readable lines.",
    )
    ssl_certfile: Path | None = Field(
        None, description="PEM certificate (chain): serve https:// and wss:// instead of plain TCP."
    )
    ssl_keyfile: Path | None = Field(None, description="PEM private key of ssl_certfile.")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description='Web origins (e.g. ["https://app.example.com"]) whose pages may call the HTTP API '
        "(CORS) and open the WebSocket. Requests without an Origin header (non-browser clients) and "
        'same-origin pages are always allowed; ["*"] allows every site.',
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description='Server names a request\'s Host header may carry (JSON list, e.g. ["stt.example.com"]; '
        '"*.example.com" matches subdomains); others get 400, WebSocket upgrades included, which stops '
        "DNS rebinding. Unset: the loopback names (localhost, 127.0.0.1, [::1]) and the listening address; "
        'any name when listening on 0.0.0.0 or ::. ["*"] allows every name.',
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description='Addresses or CIDR ranges of proxies (JSON list, e.g. ["10.0.0.0/8"]) whose '
        "X-Forwarded-For and X-Forwarded-Proto are believed: the client address (allowlist, rate limits) "
        'is then the one they report. Empty: the headers are ignored. ["*"] trusts every peer.',
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A connection must send a whole request line and headers within this time (from "
        "opening, or from its next request's first byte), or it is closed (slowloris).",
    )
    limit_concurrency: int = Field(
        0,
        ge=0,
        description="Connections and requests this process handles at once (WebSocket streams included); "
        "past it new requests get 503 from uvicorn. 0: no limit.",
    )
    ws_ping_interval_seconds: float = Field(
        10.0, gt=0, description="Server WebSocket pings keep proxies from closing idle streams."
    )
    ws_ping_timeout_seconds: float = Field(
        0.0,
        ge=0,
        description="A peer that does not answer a ping within this time is disconnected. 0 (the default): "
        "no deadline, because a pong queues behind the audio this server has not read yet (a client "
        "ahead of a busy server would be cut off with 1011); a client gone silent is closed by "
        "access.idle_timeout_seconds.",
    )
    resume_seconds: float = Field(
        30.0,
        gt=0,
        description="A client whose socket dropped may resume its stream (its resume token in the config) "
        "within this time: the same finals, segment ids and committed offset (in Redis when a shared store "
        "is configured, so on any replica).",
    )
    shutdown_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: time streams get to finish their current utterance and receive their "
        "finals before the process exits.",
    )
    max_upload_bytes: int = Field(
        25 * 1024 * 1024, ge=1024, description="Largest audio file accepted by the /v1/audio/* HTTP API."
    )
    max_upload_seconds: float = Field(
        7200.0,
        gt=0,
        description="Longest audio file accepted by the /v1/audio/* HTTP API, in seconds of audio: refused "
        "from the file's header when it says so, and decoding stops here whatever the header said (a few "
        "MiB of compressed silence can hold days of audio).",
    )
    whisper: WhisperSettings = Field(default_factory=WhisperSettings)
    vad: VadOptions = Field(default_factory=VadOptions)
    streaming: StreamingSettings = Field(default_factory=StreamingSettings)
    nemo: NemoSettings = Field(default_factory=NemoSettings)
    access: AccessSettings = Field(default_factory=AccessSettings)
    tiers: TierSettings = Field(default_factory=TierSettings)
    shared_store: SharedStoreSettings = Field(default_factory=SharedStoreSettings)

    @property
    def decode_worker_count(self) -> int:
        return self.decode_workers or os.cpu_count() or 1

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get() or os.environ.get(CONFIG_FILE_VARIABLE)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        """Settings from the environment, ``config_file`` (or $STREAMSCRIBE_CONFIG_FILE) and overrides."""
        path = config_file or os.environ.get(CONFIG_FILE_VARIABLE)
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        token = _config_file.set(Path(path) if path else None)
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        finally:
            _config_file.reset(token)


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each ``STREAMSCRIBE_*`` variable in ``environ`` that names no setting (the settings ignore it
    silently), with the setting it most likely meant, if any."""
    known = {CONFIG_FILE_VARIABLE, *_setting_variables(Settings, ENV_PREFIX)}
    unknown = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known:
            suffix = upper.removeprefix(ENV_PREFIX)
            endings = sorted(k for k in known if k.endswith(f"__{suffix}") or k.endswith(f"_{suffix}"))
            close = endings or difflib.get_close_matches(upper, known, n=1)
            unknown.append((name, close[0] if close else None))
    return unknown


def _setting_variables(model: type[BaseModel], prefix: str) -> list[str]:
    """Every variable a settings model reads: each field, and each nested group as a whole (JSON)."""
    names = []
    for name, field in model.model_fields.items():
        names.append(f"{prefix}{name.upper()}")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.extend(_setting_variables(annotation, f"{prefix}{name.upper()}__"))
    return names


def describe_settings() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, nested groups expanded."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name.upper()}__")
                continue
            default = field.get_default(call_default_factory=True)
            shown = "(generated)" if name in ("api_key", "key_pepper") else str(default)
            rows.append((f"{prefix}{name.upper()}", shown, field.description or ""))

    walk(Settings, ENV_PREFIX)
    return rows
