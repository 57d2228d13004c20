"""A streaming client: sends audio at a chosen pace and collects what the server says. Used by the CLI,
the tests and the benchmark."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Callable, Sequence
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
        reconnects: How often a dropped socket was opened again and the stream resumed.
    """

    frames: list[ReceivedFrame] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    audio_seconds: float = 0.0
    sent_at_end: float = 0.0
    reconnects: int = 0

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
    resume: bool = False,
    drop_at: Sequence[float] = (),
    resume_urls: Sequence[str] = (),
) -> StreamResult:
    """Stream ``samples`` to ``url`` at ``speed`` times real time (0: as fast as possible).

    Sends config, then audio frames of ``frame_seconds``, then ``finish`` ("stop", "commit" or "none")
    and waits for the server to close (or, for "commit", for the full transcript). ``binary``: audio goes
    in binary frames, as is, instead of base64 in JSON ``audio`` frames.

    With ``resume``, a socket that drops without a close frame is opened again (on the next of
    ``resume_urls``, else ``url``) with the stream's resume token, and the audio from the last final's
    committed offset is sent again: the server goes on with the same session. ``drop_at`` (seconds of audio
    sent) drops the socket there on purpose, without a close frame, as a changing network does (tests and
    the soak bench); it implies ``resume``.
    """
    config = {"type": "config", "sample_rate": sample_rate, **(config or {})}
    result = StreamResult(audio_seconds=len(samples) / sample_rate)
    stream = _StreamState(
        samples, sample_rate, config, result, time.monotonic(), speed, frame_seconds, sorted(drop_at), binary
    )
    tls: dict[str, Any] = {"ssl": ssl_context} if ssl_context is not None else {}
    urls = list(resume_urls) or [url]
    while True:
        target = urls[result.reconnects % len(urls)]
        # Pings without a pong deadline: a server reading behind this client (it paces fast senders) reads
        # the ping, and so answers it, only after the audio sent before it; ``timeout`` bounds the waits.
        async with connect(
            target, additional_headers=headers, max_size=None, open_timeout=30, ping_timeout=None, **tls
        ) as ws:
            lost = await stream.connection(ws, finish, on_frame, timeout)
        result.close_code = ws.close_code
        result.close_reason = ws.close_reason or ""
        if not ((lost or resume) and ws.protocol.close_rcvd is None and stream.token and not stream.finished):
            return result
        result.reconnects += 1


@dataclass
class _StreamState:
    """A stream across its connections: the audio, the resume token and the committed offset."""

    samples: np.ndarray
    rate: int
    config: dict[str, Any]
    result: StreamResult
    start: float  # monotonic time of the first connection: the pace of the audio is kept across drops
    speed: float
    frame_seconds: float
    drops: list[float]
    binary: bool  # audio in binary frames instead of base64 JSON
    token: str | None = None
    committed: float = 0.0  # the stream offset (seconds) up to which the server has committed audio
    finished: bool = False  # the full transcript came

    def note(self, frame: dict[str, Any]) -> float | None:
        """Keep what a frame says about resuming; the offset to send from when it is the ``ready`` status."""
        if frame.get("type") == "status" and frame.get("state") == "ready":
            self.token = frame.get("resume_token")
            self.committed = float(frame.get("resume_from") or 0.0)
            return self.committed
        if frame.get("type") == "final" and frame.get("committed_until") is not None:
            self.committed = float(frame["committed_until"])
        if frame.get("type") == "full_transcript":
            self.finished = True
        return None

    async def connection(
        self,
        ws: Any,
        finish: str,
        on_frame: Callable[[ReceivedFrame], None] | None,
        timeout: float,
    ) -> bool:
        """One connection: config (with the resume token after a drop), audio, ``finish``. True when this
        side dropped the socket on purpose (``drops``)."""
        got_full = asyncio.Event()
        ready: asyncio.Future[float] = asyncio.get_running_loop().create_future()

        async def receive() -> None:
            try:
                async for raw in ws:
                    received = ReceivedFrame(time.monotonic() - self.start, json.loads(raw))
                    self.result.frames.append(received)
                    resume_from = self.note(received.frame)
                    if resume_from is not None and not ready.done():
                        ready.set_result(resume_from)
                    if on_frame:
                        on_frame(received)
                    if received.frame.get("type") == "full_transcript":
                        got_full.set()
            except ConnectionClosed:
                pass
            finally:
                got_full.set()
                if not ready.done():
                    ready.set_result(0.0)

        resuming = self.token is not None
        receiver = asyncio.create_task(receive())
        audio_format = self.config.get("audio_format", "float32")
        step = max(1, int(self.frame_seconds * self.rate))
        try:
            await ws.send(json.dumps({**self.config, "resume": self.token} if resuming else self.config))
            # Resuming: the audio goes on from the committed offset the server names.
            first = round(await asyncio.wait_for(ready, timeout) * self.rate) if resuming else 0
            for offset in range(first, len(self.samples), step):
                if self.speed > 0:
                    due = self.start + offset / self.rate / self.speed
                    if (delay := due - time.monotonic()) > 0:
                        await asyncio.sleep(delay)
                if self.drops and offset / self.rate >= self.drops[0]:
                    self.drops.pop(0)
                    ws.transport.abort()  # no close frame: the TCP connection is simply gone
                    return True
                chunk = self.samples[offset : offset + step]
                if self.binary:
                    await ws.send(encode_audio(chunk, audio_format))
                else:
                    await ws.send(json.dumps({"type": "audio", "data": encode_samples(chunk, audio_format)}))
            self.result.sent_at_end = time.monotonic() - self.start
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
        return False
