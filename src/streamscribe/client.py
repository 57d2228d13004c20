"""A streaming client: sends audio at a chosen pace and collects what the server says. Used by the CLI,
the tests and the benchmark."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamscribe.audio import encode_g711
from streamscribe.protocol import G711_FORMATS, AudioFormat


@dataclass
class ReceivedFrame:
    """A server frame and when it arrived (seconds since the stream's first audio frame was sent)."""

    at: float
    frame: dict[str, Any]


@dataclass
class StreamResult:
    """Everything one streamed session produced.

    Attributes:
        frames: Server frames in arrival order, with arrival times.
        close_code: The WebSocket close code (1000 for a normal end).
        close_reason: The close reason, if any.
        audio_seconds: Duration of the audio sent.
        sent_at_end: When the last audio frame was sent (same clock as ``frames``).
    """

    frames: list[ReceivedFrame] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    audio_seconds: float = 0.0
    sent_at_end: float = 0.0

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f.frame for f in self.frames if f.frame.get("type") == kind]

    @property
    def full_transcript(self) -> str | None:
        frames = self.of_type("full_transcript")
        return frames[-1]["text"] if frames else None

    @property
    def error(self) -> dict[str, Any] | None:
        errors = self.of_type("error")
        return errors[0] if errors else None


def stream_url(base_url: str, token: str | None) -> str:
    """ws://host:port -> the streaming endpoint with ``?token=`` when a token is given."""
    url = base_url.rstrip("/")
    if not url.endswith("/transcribe"):
        url += "/api/v1/audio/stream/transcribe"
    return f"{url}?{urlencode({'token': token})}" if token else url


def encode_audio(samples: np.ndarray, audio_format: str = "float32") -> bytes:
    """Float32 samples as a frame's bytes in ``audio_format`` (float32, pcm16, mulaw or alaw)."""
    if audio_format in G711_FORMATS:
        return encode_g711(samples, AudioFormat(audio_format))
    if audio_format == "pcm16":
        return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    return samples.astype("<f4").tobytes()


def encode_samples(samples: np.ndarray, audio_format: str = "float32") -> str:
    """Samples as the base64 ``data`` of a JSON audio frame."""
    return base64.b64encode(encode_audio(samples, audio_format)).decode()


async def stream_audio(
    url: str,
    samples: np.ndarray,
    sample_rate: int,
    config: dict[str, Any] | None = None,
    speed: float = 1.0,
    frame_seconds: float = 0.1,
    finish: str = "stop",
    on_frame: Callable[[ReceivedFrame], None] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
    ssl_context: ssl.SSLContext | None = None,
    binary: bool = False,
) -> StreamResult:
    """Stream ``samples`` to ``url`` at ``speed`` times real time (0: as fast as possible).

    Sends config, then audio frames of ``frame_seconds``, then ``finish`` ("stop", "commit" or "none")
    and waits for the server to close (or, for "commit", for the full transcript). ``binary``: audio goes
    in binary frames, as is, instead of base64 in JSON ``audio`` frames.
    """
    config = {"type": "config", "sample_rate": sample_rate, **(config or {})}
    audio_format = config.get("audio_format", "float32")
    result = StreamResult(audio_seconds=len(samples) / sample_rate)
    step = max(1, int(frame_seconds * sample_rate))
    tls: dict[str, Any] = {"ssl": ssl_context} if ssl_context is not None else {}
    async with connect(url, additional_headers=headers, max_size=None, open_timeout=30, **tls) as ws:
        start = time.monotonic()
        got_full = asyncio.Event()

        async def receive() -> None:
            try:
                async for raw in ws:
                    received = ReceivedFrame(time.monotonic() - start, json.loads(raw))
                    result.frames.append(received)
                    if on_frame:
                        on_frame(received)
                    if received.frame.get("type") == "full_transcript":
                        got_full.set()
            except ConnectionClosed:
                pass
            finally:
                got_full.set()

        receiver = asyncio.create_task(receive())
        try:
            await ws.send(json.dumps(config))
            for index, offset in enumerate(range(0, len(samples), step)):
                if speed > 0:
                    delay = start + index * frame_seconds / speed - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                chunk = samples[offset : offset + step]
                if binary:
                    await ws.send(encode_audio(chunk, audio_format))
                else:
                    await ws.send(json.dumps({"type": "audio", "data": encode_samples(chunk, audio_format)}))
            result.sent_at_end = time.monotonic() - start
            if finish != "none":
                await ws.send(json.dumps({"type": finish}))
            if finish == "commit":
                await asyncio.wait_for(got_full.wait(), timeout)
                await ws.close()
            await asyncio.wait_for(receiver, timeout)
        except ConnectionClosed:
            await asyncio.wait_for(receiver, timeout)
        finally:
            receiver.cancel()
        result.close_code = ws.close_code
        result.close_reason = ws.close_reason or ""
    return result
