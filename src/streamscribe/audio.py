"""Audio in: decoding wire frames, resampling to the engine's rate, files, and the growing buffer."""

from __future__ import annotations

import base64
import binascii
import itertools
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol

import av
import numpy as np
import soxr
from av.audio.codeccontext import AudioCodecContext

from streamscribe.engines import SAMPLE_RATE
from streamscribe.protocol import G711_FORMATS, G711_SAMPLE_RATE, AudioFormat, ErrorType, StreamError


def _base64_bytes(data: str, max_bytes: int) -> bytes:
    if len(data) > (max_bytes * 4) // 3 + 4:
        raise StreamError(ErrorType.INVALID_AUDIO, f"audio frame larger than {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise StreamError(ErrorType.INVALID_AUDIO, "audio data is not valid base64") from None


def _decode_pcm(raw: bytes, audio_format: AudioFormat) -> np.ndarray:
    """Little-endian float32 or pcm16 bytes -> float32 in [-1, 1]. Raises StreamError(invalid_audio)."""
    dtype = _SAMPLE_DTYPES[audio_format]
    if len(raw) % dtype.itemsize:
        raise StreamError(
            ErrorType.INVALID_AUDIO,
            f"audio frame has {len(raw)} bytes, not a multiple of the "
            f"{dtype.itemsize}-byte {audio_format} sample",
        )
    samples = np.frombuffer(raw, dtype=dtype)
    if audio_format == AudioFormat.PCM16:
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


_SAMPLE_DTYPES: dict[AudioFormat, np.dtype] = {
    AudioFormat.FLOAT32: np.dtype("<f4"),
    AudioFormat.PCM16: np.dtype("<i2"),
}
# PyAV's (FFmpeg's) G.711 codecs: one byte a sample, no state between frames.
_G711_CODECS: dict[AudioFormat, Literal["pcm_mulaw", "pcm_alaw"]] = {
    AudioFormat.MULAW: "pcm_mulaw",
    AudioFormat.ALAW: "pcm_alaw",
}


def _g711_codec(audio_format: AudioFormat, sample_rate: int, mode: Literal["r", "w"]) -> AudioCodecContext:
    codec = av.CodecContext.create(_G711_CODECS[audio_format], mode)
    codec.sample_rate = sample_rate
    codec.layout = "mono"
    if mode == "w":
        codec.format = "s16"
    return codec


def decode_audio_payload(data: str, audio_format: AudioFormat, max_bytes: int) -> np.ndarray:
    """Base64 samples (float32, pcm16, mulaw or alaw) -> float32 in [-1, 1], at the rate they were sent.
    Raises StreamError(invalid_audio). Opus needs a stream's state: use AudioInput."""
    if audio_format is AudioFormat.OPUS:
        raise ValueError("opus is decoded per stream: use AudioInput")
    raw = _base64_bytes(data, max_bytes)
    if audio_format in G711_FORMATS:
        return _G711Decoder(audio_format, G711_SAMPLE_RATE)(raw)[0]
    return _decode_pcm(raw, audio_format)


def encode_g711(samples: np.ndarray, audio_format: AudioFormat, sample_rate: int = G711_SAMPLE_RATE) -> bytes:
    """Float32 samples in [-1, 1] -> G.711 bytes (mulaw or alaw): what a telephone system sends."""
    codec = _g711_codec(audio_format, sample_rate, "w")
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate = sample_rate
    return b"".join(bytes(packet) for packet in [*codec.encode(frame), *codec.encode(None)])


class _G711Decoder:
    """G.711 bytes -> float32 samples, by FFmpeg's pcm_mulaw / pcm_alaw decoder."""

    def __init__(self, audio_format: AudioFormat, sample_rate: int) -> None:
        self._codec = _g711_codec(audio_format, sample_rate, "r")
        self._rate = sample_rate

    def close(self) -> None:
        pass

    def __call__(self, raw: bytes) -> tuple[np.ndarray, int]:
        frames = self._codec.decode(av.Packet(raw)) if raw else []
        pcm = [frame.to_ndarray().reshape(-1) for frame in frames]
        return np.concatenate([np.zeros(0, dtype=np.int16), *pcm]).astype(np.float32) / 32768.0, self._rate


class _PcmDecoder:
    def __init__(self, audio_format: AudioFormat, sample_rate: int) -> None:
        self._format = audio_format
        self._rate = sample_rate

    def close(self) -> None:
        pass

    def __call__(self, raw: bytes) -> tuple[np.ndarray, int]:
        return _decode_pcm(raw, self._format), self._rate


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


OPUS_SAMPLE_RATE = 48000  # what Opus decodes to, whatever the encoder's input was
# The magic numbers that open each container Opus may come in, and FFmpeg's demuxer for it.
_OPUS_CONTAINERS = {b"OggS": "ogg", b"\x1a\x45\xdf\xa3": "matroska"}
_OPUS_MAGIC_BYTES = 4
# One frame may hold at most this much audio: a frame of Opus silence (a few bytes per 20 ms) would
# otherwise decode to an hour of samples.
MAX_OPUS_FRAME_SECONDS = 60.0
_OPUS_DECODE_TIMEOUT_SECONDS = 10.0


class _ContainerReader:
    """One Ogg or WebM stream, demuxed and decoded by PyAV as its bytes arrive. The demuxer pulls bytes
    with blocking reads, so it runs in a thread of its own that reads from this object; ``feed`` hands
    bytes over and returns what decoded once the demuxer waits for more."""

    def __init__(self, container_format: str) -> None:
        self._lock = threading.Condition()
        self._pending = bytearray()  # received, not yet read by the demuxer
        self._waiting = False  # the demuxer waits for bytes
        self._closed = False
        self._decoded: list[np.ndarray] = []
        self._decoded_samples = 0
        self._error: str | None = None
        self.finished = False  # the stream came to its end (the next bytes must start a new one)
        self._thread = threading.Thread(target=self._demux, args=(container_format,), daemon=True)
        self._thread.start()

    def feed(self, raw: bytes) -> np.ndarray:
        """Raises StreamError(invalid_audio) when the stream is bad or ended; this reader is then done."""
        with self._lock:
            self._pending += raw
            self._waiting = False
            self._lock.notify_all()
            caught_up = self._lock.wait_for(
                lambda: (self._waiting and not self._pending) or self._error is not None or self.finished,
                _OPUS_DECODE_TIMEOUT_SECONDS,
            )
            decoded, self._decoded, self._decoded_samples = self._decoded, [], 0
            error = self._error or (None if caught_up else "the opus stream did not decode in time")
        if error is not None:
            raise StreamError(ErrorType.INVALID_AUDIO, error)
        return np.concatenate(decoded) if decoded else np.zeros(0, dtype=np.float32)

    def read(self, size: int) -> bytes:
        """The demuxer's file: the bytes received so far, waiting for more when there are none."""
        with self._lock:
            while not self._pending and not self._closed:
                self._waiting = True
                self._lock.notify_all()
                self._lock.wait()
            chunk = bytes(self._pending[:size])
            del self._pending[:size]
            return chunk

    def close(self) -> None:
        """End the thread: the demuxer reads the end of the file."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def _demux(self, container_format: str) -> None:
        to_mono = av.audio.resampler.AudioResampler(format="flt", layout="mono", rate=OPUS_SAMPLE_RATE)
        limit = int(MAX_OPUS_FRAME_SECONDS * OPUS_SAMPLE_RATE)
        error: str | None = None
        try:
            with av.open(self, "r", format=container_format, options={"probesize": "32"}) as container:
                if not container.streams.audio:
                    raise ValueError("it has no audio track")
                for packet in container.demux(container.streams.audio[0]):
                    try:
                        frames = packet.decode()
                    except av.error.InvalidDataError:
                        continue  # a damaged packet: the next one still decodes
                    for frame in frames:
                        frame.pts = None  # resample by sample count: timestamps do not matter
                        for mono in to_mono.resample(frame):
                            with self._lock:
                                self._decoded.append(mono.to_ndarray().reshape(-1).copy())
                                self._decoded_samples += mono.samples
                                if self._decoded_samples > limit:
                                    raise ValueError(
                                        f"a frame held over {MAX_OPUS_FRAME_SECONDS:g} s of audio"
                                    )
        except (av.error.FFmpegError, ValueError) as exc:
            error = f"not a valid Ogg or WebM Opus stream: {_ffmpeg_reason(exc)}"
        with self._lock:
            self._error = error
            self.finished = True
            self._lock.notify_all()


class _ContainerOpusDecoder:
    """Opus in Ogg or WebM (the container told by its first bytes), one stream after another: after a bad
    or ended stream, the next frame starts a new one (a client restarts its recorder). The first bytes may
    come split over frames (Chromium's MediaRecorder may hand over a one-byte first slice): they are kept
    until they name a container."""

    def __init__(self) -> None:
        self._reader: _ContainerReader | None = None
        self._head = b""  # a new stream's first bytes, fewer than a magic number's

    def __call__(self, raw: bytes) -> tuple[np.ndarray, int]:
        if self._reader is not None and self._reader.finished:
            self.close()
        if self._reader is None:
            head, self._head = self._head + bytes(raw), b""
            if len(head) < _OPUS_MAGIC_BYTES and any(magic.startswith(head) for magic in _OPUS_CONTAINERS):
                self._head = head
                return np.zeros(0, dtype=np.float32), OPUS_SAMPLE_RATE
            container = _OPUS_CONTAINERS.get(head[:_OPUS_MAGIC_BYTES])
            if container is None:
                raise StreamError(
                    ErrorType.INVALID_AUDIO,
                    "opus audio must be an Ogg or WebM stream, sent from its first bytes (OggS or EBML)",
                )
            self._reader = _ContainerReader(container)
            raw = head
        try:
            return self._reader.feed(raw), OPUS_SAMPLE_RATE
        except StreamError:
            self.close()
            raise

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def _ffmpeg_reason(exc: Exception) -> str:
    """What went wrong, without FFmpeg's file name (here, a Python object's repr)."""
    if isinstance(exc, av.error.FFmpegError):
        return str(exc.strerror or "invalid data").rstrip(".").lower()
    return str(exc)


class _FrameDecoder(Protocol):
    """One stream's decoder of one format: a frame's bytes -> (mono float32 samples, their rate)."""

    def __call__(self, raw: bytes) -> tuple[np.ndarray, int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DecodedAudio:
    """One frame's audio.

    Attributes:
        seconds: its length as sent (what quotas and pacing count).
        samples: it at the engine's rate, mono float32 in [-1, 1].
    """

    seconds: float
    samples: np.ndarray


class AudioInput:
    """One stream's audio in, whatever the format: a frame's bytes (a binary frame, or a JSON frame's base64)
    -> samples at the engine's rate. Holds what crosses frame borders: the resampler's filter, and for Opus
    the container being read. Blocking (decoding, resampling): call it from a worker thread."""

    def __init__(
        self, audio_format: AudioFormat, sample_rate: int, engine_rate: int, max_frame_bytes: int
    ) -> None:
        self.audio_format = audio_format
        self._max_bytes = max_frame_bytes
        self._decoder: _FrameDecoder
        if audio_format is AudioFormat.OPUS:
            self._decoder = _ContainerOpusDecoder()
            sample_rate = OPUS_SAMPLE_RATE
        elif audio_format in G711_FORMATS:
            self._decoder = _G711Decoder(audio_format, sample_rate)
        else:
            self._decoder = _PcmDecoder(audio_format, sample_rate)
        self._resampler = StreamResampler(sample_rate, engine_rate)

    def decode(self, raw: bytes) -> DecodedAudio:
        """Raises StreamError(invalid_audio) for a frame over the size limit or one that does not decode;
        the stream may go on."""
        if len(raw) > self._max_bytes:
            raise StreamError(ErrorType.INVALID_AUDIO, f"audio frame larger than {self._max_bytes} bytes")
        samples, rate = self._decoder(raw)
        return DecodedAudio(len(samples) / rate, self._resampler(samples))

    def decode_base64(self, data: str) -> DecodedAudio:
        return self.decode(_base64_bytes(data, self._max_bytes))

    def flush(self) -> np.ndarray:
        """The samples still held in the resampler's filter (see StreamResampler.flush)."""
        return self._resampler.flush()

    def close(self) -> None:
        """The stream ended: let go of the decoder (Opus: its reader thread)."""
        self._decoder.close()


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
