"""Audio frames in: decoding, validation, resampling and the stream buffer."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from streamscribe.audio import (
    AudioBuffer,
    StreamResampler,
    audio_file_seconds,
    decode_audio_payload,
    decode_pcm,
    iter_audio_file,
)
from streamscribe.protocol import ErrorType, StreamError
from tests.audio_files import encode


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_float32_and_pcm16_decode_to_the_same_signal() -> None:
    signal = np.linspace(-0.5, 0.5, 100, dtype=np.float32)
    as_float = decode_audio_payload(b64(signal.astype("<f4").tobytes()), "float32", 10_000)
    as_pcm = decode_audio_payload(b64((signal * 32768).astype("<i2").tobytes()), "pcm16", 10_000)
    np.testing.assert_allclose(as_float, signal)
    np.testing.assert_allclose(as_pcm, signal, atol=1e-4)


def test_out_of_range_floats_are_clipped() -> None:
    decoded = decode_audio_payload(b64(np.array([3.0, -3.0], dtype="<f4").tobytes()), "float32", 100)
    assert decoded.tolist() == [1.0, -1.0]


@pytest.mark.parametrize(
    ("payload", "audio_format", "reason"),
    [
        ("***", "float32", "base64"),
        (b64(b"\0" * 6), "float32", "multiple"),
        (b64(b"\0" * 3), "pcm16", "multiple"),
        (b64(np.array([np.nan], dtype="<f4").tobytes()), "float32", "NaN"),
        (b64(b"\0" * 400), "float32", "larger"),
    ],
)
def test_invalid_frames_are_rejected(payload: str, audio_format: str, reason: str) -> None:
    with pytest.raises(StreamError) as caught:
        decode_audio_payload(payload, audio_format, 256)  # type: ignore[arg-type]
    assert caught.value.error_type is ErrorType.INVALID_AUDIO and caught.value.close_code is None
    assert reason in caught.value.message


def test_raw_pcm_of_every_width_decodes_to_the_same_mono_signal() -> None:
    """Wyoming's chunks: 8-bit unsigned, 16- and 32-bit signed; channels averaged."""
    signal = np.linspace(-0.5, 0.5, 64, dtype=np.float32)
    as_8 = (signal * 128 + 128).astype("u1").tobytes()
    as_16 = (signal * 32768).astype("<i2").tobytes()
    stereo_32 = (np.stack([signal, -signal / 2], axis=1).reshape(-1) * 2**31).astype("<i4").tobytes()
    np.testing.assert_allclose(decode_pcm(as_8, 1, 1), signal, atol=1 / 128)
    np.testing.assert_allclose(decode_pcm(as_16, 2, 1), signal, atol=1e-4)
    np.testing.assert_allclose(decode_pcm(stereo_32, 4, 2), signal / 4, atol=1e-6)


@pytest.mark.parametrize(
    ("raw", "width", "channels", "reason"),
    [(b"\0" * 6, 3, 1, "width"), (b"\0" * 4, 2, 0, "channels"), (b"\0" * 6, 2, 2, "multiple")],
)
def test_invalid_raw_pcm_is_rejected(raw: bytes, width: int, channels: int, reason: str) -> None:
    with pytest.raises(StreamError) as caught:
        decode_pcm(raw, width, channels)
    assert caught.value.error_type is ErrorType.INVALID_AUDIO and reason in caught.value.message


def test_streamed_resampling_matches_length_and_tone() -> None:
    rate = 48000
    t = np.arange(rate) / rate
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    resample = StreamResampler(rate, 16000)
    pieces = [resample(chunk) for chunk in np.array_split(tone, 37)] + [
        resample(np.zeros(0, np.float32), True)
    ]
    out = np.concatenate(pieces)
    assert abs(len(out) - 16000) <= 2
    spectrum = np.abs(np.fft.rfft(out[:16000]))
    assert abs(int(np.argmax(spectrum)) - 440) <= 1


def test_buffer_keeps_absolute_positions_when_trimmed() -> None:
    buffer = AudioBuffer(capacity=4)
    buffer.append(np.arange(10, dtype=np.float32))
    buffer.trim_before(6)
    buffer.append(np.arange(10, 13, dtype=np.float32))
    assert (buffer.start, buffer.end, len(buffer)) == (6, 13, 7)
    assert buffer.slice(5, 9).tolist() == [6, 7, 8]
    assert buffer.slice(0, 3).tolist() == []


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_flushing_the_resampler_returns_every_sample_and_starts_afresh(rate: int) -> None:
    resample = StreamResampler(rate, 16000)
    second = np.ones(rate, dtype=np.float32)
    for _ in range(2):  # a commit, then more audio and another commit
        out = np.concatenate([resample(chunk) for chunk in np.array_split(second, 10)] + [resample.flush()])
        assert abs(len(out) - 16000) <= 2
    assert len(resample.flush()) == 0
    assert len(StreamResampler(16000, 16000).flush()) == 0


def test_a_long_file_is_decoded_in_bounded_pieces(tmp_path: Path, clip: Callable[[str], np.ndarray]) -> None:
    # Ten minutes of 48 kHz stereo FLAC: pieces of 10 s at 16 kHz mono, never the whole recording at once.
    speech = np.tile(clip("long.wav"), 8)
    path = tmp_path / "lecture.flac"
    path.write_bytes(encode(speech, "flac", "flac", 48000))
    pieces = list(iter_audio_file(path, 16000, chunk_seconds=10.0))
    assert len(pieces) >= 60
    assert max(len(piece) for piece in pieces) <= 16000 * 10.2
    assert abs(sum(len(piece) for piece in pieces) - len(speech)) <= 16000 * 0.05
    assert abs(audio_file_seconds(path) - len(speech) / 16000) <= 0.05
    # The downmix is the speech (the right channel is the left at 80 %), resampled twice.
    middle = slice(16000 * 100, 16000 * 101)
    decoded = np.concatenate(pieces)
    assert np.corrcoef(decoded[middle], speech[middle])[0, 1] > 0.95
