"""Audio in: decoding wire frames, resampling to the engine's rate, files, and the growing buffer."""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import av
import numpy as np
import soxr

from streamscribe.engines import SAMPLE_RATE
from streamscribe.protocol import ErrorType, StreamError

AudioFormat = Literal["float32", "pcm16"]
_SAMPLE_DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "pcm16": np.dtype("<i2")}


def decode_audio_payload(data: str, audio_format: AudioFormat, max_bytes: int) -> np.ndarray:
    """Base64 little-endian samples -> float32 in [-1, 1]. Raises StreamError(invalid_audio)."""
    if len(data) > (max_bytes * 4) // 3 + 4:
        raise StreamError(ErrorType.INVALID_AUDIO, f"audio frame larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise StreamError(ErrorType.INVALID_AUDIO, "audio data is not valid base64") from None
    dtype = _SAMPLE_DTYPES[audio_format]
    if len(raw) % dtype.itemsize:
        raise StreamError(
            ErrorType.INVALID_AUDIO,
            f"audio frame has {len(raw)} bytes, not a multiple of the "
            f"{dtype.itemsize}-byte {audio_format} sample",
        )
    samples = np.frombuffer(raw, dtype=dtype)
    if audio_format == "pcm16":
        return samples.astype(np.float32) / 32768.0
    if not np.isfinite(samples).all():
        raise StreamError(ErrorType.INVALID_AUDIO, "audio frame contains NaN or infinite samples")
    return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)


# Sample widths of raw PCM (Wyoming's audio chunks): 8-bit unsigned, 16- and 32-bit signed, little-endian.
_PCM_DTYPES: dict[int, np.dtype] = {1: np.dtype("u1"), 2: np.dtype("<i2"), 4: np.dtype("<i4")}
PCM_WIDTHS = tuple(_PCM_DTYPES)
MAX_PCM_CHANNELS = 8


def decode_pcm(raw: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved raw PCM of ``width`` bytes a sample and ``channels`` channels -> mono float32 in [-1, 1]
    (channels averaged). Raises StreamError(invalid_audio)."""
    dtype = _PCM_DTYPES.get(width)
    if dtype is None:
        raise StreamError(ErrorType.INVALID_AUDIO, f"sample width {width} is not one of {PCM_WIDTHS} bytes")
    if not 1 <= channels <= MAX_PCM_CHANNELS:
        raise StreamError(ErrorType.INVALID_AUDIO, f"{channels} channels: expected 1 to {MAX_PCM_CHANNELS}")
    frame_bytes = width * channels
    if len(raw) % frame_bytes:
        raise StreamError(
            ErrorType.INVALID_AUDIO,
            f"audio has {len(raw)} bytes, not a multiple of {frame_bytes} ({channels} channels of {width})",
        )
    samples = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    if width == 1:
        samples -= 128.0
    samples /= float(1 << (8 * width - 1))
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples


class StreamResampler:
    """Resamples a live stream chunk by chunk, keeping filter state across chunk borders."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self._rates = (in_rate, out_rate)
        self._stream = self._new_stream()

    def _new_stream(self) -> soxr.ResampleStream | None:
        in_rate, out_rate = self._rates
        return None if in_rate == out_rate else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32")

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples, last=last)

    def flush(self) -> np.ndarray:
        """The samples still held in the filter (tens of ms; about 95 ms from 8 kHz), so a commit ends on
        the last sample sent. The next chunk starts a fresh stream."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream = self._new_stream()
        return tail


AudioSource = str | Path | BinaryIO


def _open(source: AudioSource) -> av.container.InputContainer:
    if not isinstance(source, str | Path):
        source.seek(0)
    return av.open(str(source) if isinstance(source, str | Path) else source, "r", metadata_errors="ignore")


def _decoded_frames(container: av.container.InputContainer) -> Iterator[av.AudioFrame]:
    """The first audio stream's frames, packet by packet: a damaged packet is skipped (the rest of the
    file still decodes), a damaged container ends the audio where it breaks."""
    stream = container.streams.audio[0]
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError:
            return
        try:
            yield from packet.decode()
        except av.error.InvalidDataError:
            continue


def audio_file_seconds(source: AudioSource) -> float:
    """The length of a file's audio, found by decoding it (headers may lie about it), without keeping it.
    Raises ValueError when the file holds no decodable audio stream."""
    with _open(source) as container:
        if not container.streams.audio:
            raise ValueError("the file has no audio stream")
        return sum(frame.samples / frame.sample_rate for frame in _decoded_frames(container))


def declared_seconds(source: AudioSource) -> float | None:
    """The length of a file's audio as its header gives it, read without decoding (None when it gives
    none). A first check only: a header may lie, so whoever decodes must still count. Raises ValueError
    when the file has no audio stream."""
    with _open(source) as container:
        if not container.streams.audio:
            raise ValueError("the file has no audio stream")
        stream = container.streams.audio[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        return container.duration / av.time_base if container.duration is not None else None


def iter_audio_file(
    source: AudioSource, sample_rate: int = SAMPLE_RATE, chunk_seconds: float = 10.0
) -> Generator[np.ndarray, None, None]:
    """Decode any file PyAV reads (wav, flac, mp3, ogg, m4a, webm; any rate, any channels) piece by piece,
    by path or as an open binary file, as mono float32 chunks at ``sample_rate``: a long recording is
    never held whole."""
    resampler = av.audio.resampler.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunk = int(chunk_seconds * sample_rate)
    pending: list[np.ndarray] = []
    held = 0
    with _open(source) as container:
        if not container.streams.audio:
            raise ValueError("the file has no audio stream")
        for frame in itertools.chain(_decoded_frames(container), [None]):
            if frame is not None:
                frame.pts = None  # resample by sample count: broken timestamps do not matter
            for resampled in resampler.resample(frame):
                pending.append(resampled.to_ndarray().reshape(-1))
                held += resampled.samples
                if held >= chunk:
                    yield np.clip(np.concatenate(pending), -1.0, 1.0)
                    pending, held = [], 0
    if held:
        yield np.clip(np.concatenate(pending), -1.0, 1.0)


def load_audio_file(source: AudioSource, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A whole file as one mono float32 array at ``sample_rate`` (for clients that send it as a stream)."""
    chunks = list(iter_audio_file(source, sample_rate))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


class AudioBuffer:
    """Audio of one stream from ``start`` (absolute sample index) to ``end``; trimmed from the front."""

    def __init__(self, capacity: int = SAMPLE_RATE * 8) -> None:
        self._data = np.zeros(capacity, dtype=np.float32)
        self._length = 0
        self.start = 0

    @property
    def end(self) -> int:
        return self.start + self._length

    def __len__(self) -> int:
        return self._length

    def append(self, samples: np.ndarray) -> None:
        needed = self._length + len(samples)
        if needed > len(self._data):
            grown = np.zeros(max(needed, 2 * len(self._data)), dtype=np.float32)
            grown[: self._length] = self._data[: self._length]
            self._data = grown
        self._data[self._length : needed] = samples
        self._length = needed

    def slice(self, start: int, end: int) -> np.ndarray:
        """A copy of absolute samples [start, end), clipped to what the buffer holds."""
        lo = max(start, self.start) - self.start
        hi = min(end, self.end) - self.start
        return self._data[lo:hi].copy() if hi > lo else np.zeros(0, dtype=np.float32)

    def trim_before(self, index: int) -> None:
        """Forget samples before absolute ``index``."""
        drop = min(max(index - self.start, 0), self._length)
        if drop:
            self._data[: self._length - drop] = self._data[drop : self._length]
            self._length -= drop
            self.start += drop

    def clear(self, start: int) -> None:
        self._length = 0
        self.start = start
