"""Audio frames in: decoding, validation, resampling and the stream buffer."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from streamscribe import audio
from streamscribe.audio import (
    AudioBuffer,
    AudioInput,
    StreamResampler,
    audio_file_seconds,
    decode_audio_payload,
    decode_pcm,
    encode_g711,
    iter_audio_file,
)
from streamscribe.protocol import AudioFormat, ErrorType, StreamError
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


def tone(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def peak_hz(samples: np.ndarray, rate: int) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(samples))) * rate / len(samples))


@pytest.mark.parametrize(
    ("audio_format", "codes", "values"),
    [
        # G.711's tables: mu-law 0xFF and 0x7F are the two zeros, 0x80 / 0x00 the extremes; A-law 0xD5 / 0x55
        # the smallest steps either side of zero.
        (AudioFormat.MULAW, b"\xff\x7f\x80\x00", [0, 0, 32124, -32124]),
        (AudioFormat.ALAW, b"\xd5\x55\xaa\x2a", [8, -8, 32256, -32256]),
    ],
)
def test_g711_decodes_by_the_standard_tables(
    audio_format: AudioFormat, codes: bytes, values: list[int]
) -> None:
    decoded = decode_audio_payload(b64(codes), audio_format, 100)
    assert (decoded * 32768).round().astype(int).tolist() == values


@pytest.mark.parametrize("audio_format", [AudioFormat.MULAW, AudioFormat.ALAW])
def test_g711_at_8_khz_reaches_the_engine_at_16_khz(audio_format: AudioFormat) -> None:
    sent = tone(1.0, 8000)
    coded = encode_g711(sent, audio_format)
    assert len(coded) == len(sent)  # one byte a sample
    audio_input = AudioInput(audio_format, 8000, 16000, 10_000)
    decoded = [audio_input.decode(coded[i : i + 800]) for i in range(0, len(coded), 800)]
    assert sum(d.seconds for d in decoded) == pytest.approx(1.0)
    out = np.concatenate([d.samples for d in decoded] + [audio_input.flush()])
    assert abs(len(out) - 16000) <= 2
    assert peak_hz(out, 16000) == pytest.approx(440, abs=1)
    # Companding keeps about 38 dB of signal to noise on a tone at half scale (its RMS is 0.35).
    error = decode_audio_payload(b64(coded), audio_format, 10_000) - sent
    assert np.sqrt(np.mean(error**2)) < 0.01


def test_binary_frames_over_the_limit_are_refused() -> None:
    audio_input = AudioInput(AudioFormat.PCM16, 16000, 16000, 1024)
    assert audio_input.decode(b"\0" * 1024).seconds == pytest.approx(512 / 16000)
    with pytest.raises(StreamError, match="larger than 1024 bytes"):
        audio_input.decode(b"\0" * 1026)


@pytest.fixture(scope="module")
def opus_tone() -> dict[str, bytes]:
    """Two seconds of a 440 Hz tone as Ogg and as WebM Opus."""
    return {name: encode(tone(2.0, 16000), name, "libopus", 48000, channels=1) for name in ("ogg", "webm")}


@pytest.mark.parametrize("container", ["ogg", "webm"])
def test_opus_decodes_as_its_bytes_arrive(opus_tone: dict[str, bytes], container: str) -> None:
    audio_input = AudioInput(AudioFormat.OPUS, 16000, 16000, 10_000)
    data = opus_tone[container]
    decoded = [audio_input.decode(data[i : i + 700]) for i in range(0, len(data), 700)]
    audio_input.close()
    # Audio comes out while the stream goes on (Ogg: a page at a time), not only at its end.
    assert sum(d.seconds for d in decoded[: len(decoded) // 2 + 1]) > 0.5
    assert sum(d.seconds for d in decoded) == pytest.approx(2.0, abs=0.05)
    out = np.concatenate([d.samples for d in decoded])
    assert peak_hz(out[1600:-1600], 16000) == pytest.approx(440, abs=2)


@pytest.mark.parametrize("container", ["ogg", "webm"])
def test_opus_whose_first_bytes_come_split_over_frames_decodes(
    opus_tone: dict[str, bytes], container: str
) -> None:
    """Chromium's MediaRecorder may send a one-byte first slice: the container is told once 4 bytes came."""
    audio_input = AudioInput(AudioFormat.OPUS, 16000, 16000, 10_000)
    data = opus_tone[container]
    pieces = [data[:1], data[1:2], data[2:3], *(data[i : i + 700] for i in range(3, len(data), 700))]
    decoded = [audio_input.decode(piece) for piece in pieces]
    audio_input.close()
    assert sum(d.seconds for d in decoded) == pytest.approx(2.0, abs=0.05)


def test_a_bad_opus_stream_is_refused_and_the_next_one_decodes(opus_tone: dict[str, bytes]) -> None:
    audio_input = AudioInput(AudioFormat.OPUS, 16000, 16000, 100_000)
    with pytest.raises(StreamError, match="Ogg or WebM") as caught:
        audio_input.decode(b"RIFF....WAVEfmt ")
    assert caught.value.error_type is ErrorType.INVALID_AUDIO
    assert audio_input.decode(b"Og").seconds == 0  # perhaps Ogg: told by the next bytes
    with pytest.raises(StreamError, match="Ogg or WebM"):
        audio_input.decode(b"x")  # "Ogx": neither
    noise = np.random.default_rng(1).integers(0, 256, 70_000, dtype=np.uint8).tobytes()
    with pytest.raises(StreamError, match="not a valid Ogg or WebM Opus stream"):
        audio_input.decode(b"OggS" + noise)
    assert audio_input.decode(opus_tone["webm"]).seconds == pytest.approx(2.0, abs=0.05)
    audio_input.close()


def test_an_opus_frame_may_not_hold_too_much_audio(
    opus_tone: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audio, "MAX_OPUS_FRAME_SECONDS", 1.0)
    audio_input = AudioInput(AudioFormat.OPUS, 16000, 16000, 100_000)
    with pytest.raises(StreamError, match="over 1 s"):
        audio_input.decode(opus_tone["ogg"])
    audio_input.close()


def test_closing_an_opus_input_ends_its_reader_thread(opus_tone: dict[str, bytes]) -> None:
    before = set(threading.enumerate())
    audio_input = AudioInput(AudioFormat.OPUS, 16000, 16000, 100_000)
    audio_input.decode(opus_tone["ogg"][:2000])
    (reader,) = set(threading.enumerate()) - before
    audio_input.close()
    reader.join(timeout=5)
    assert not reader.is_alive()


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
