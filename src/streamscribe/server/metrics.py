"""Prometheus metrics of one server. Each app has its own registry (tests run several in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class ServerMetrics:
    """Every metric the server exports, named ``streamscribe_*``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_streams = Gauge("streamscribe_active_streams", "WebSocket streams open now.", registry=r)
        self.streams = Counter(
            "streamscribe_streams", "WebSocket streams accepted (authenticated).", registry=r
        )
        self.audio_seconds = Counter(
            "streamscribe_audio_seconds",
            "Seconds of audio received for transcription.",
            ["source"],  # stream | file
            registry=r,
        )
        self.decode_seconds = Histogram(
            "streamscribe_decode_seconds",
            "Wall time of one engine call (one batch).",
            ["engine", "kind"],  # kind: final | partial (windows) | step (a streaming engine's step)
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "streamscribe_decode_batch_size",
            "Windows (or stream pieces) per engine call.",
            ["engine"],
            buckets=(1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.emission_delay = Histogram(
            "streamscribe_emission_delay_seconds",
            "From receiving the audio at a segment's end to sending its partial or final text.",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "streamscribe_errors", "Errors reported to clients, by error_type.", ["error_type"], registry=r
        )
        self.quota_rejections = Counter(
            "streamscribe_quota_rejections",
            "Requests or streams refused because a key's quota was used up.",
            ["reason"],
            registry=r,
        )
        self.http_requests = Counter(
            "streamscribe_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=r,
        )

    def batch_decoded(self, engine: str, kind: str, size: int, seconds: float) -> None:
        """Called by the decode scheduler after each engine call."""
        self.decode_seconds.labels(engine, kind).observe(seconds)
        self.batch_size.labels(engine).observe(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
