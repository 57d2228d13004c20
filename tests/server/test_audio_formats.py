"""Every audio format and both frame kinds through the real server and the bundled model: G.711 telephone
audio, Opus in Ogg and WebM as a browser's MediaRecorder sends it, binary frames; and bad input in each,
which gets an error frame while the session (and every other one) goes on."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from streamscribe.audio import encode_g711
from streamscribe.protocol import AudioFormat
from tests.audio_files import encode
from tests.conftest import DATA, RunningServer, normalize_text, read_wav, word_error_rate
from tests.server.test_inputs import PHONE_WER
from tests.server.test_stream_errors import STOP, _exchange, config, exchange

SHORT_WORDS = {"quarterly", "report", "finance", "team", "friday"}
NOISE = np.random.default_rng(0).integers(0, 256, 70_000, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def phone() -> np.ndarray:
    samples, rate = read_wav(DATA / "phone8k.wav")
    assert rate == 8000
    return samples


@pytest.fixture(scope="module")
def opus_files(clip: Callable[[str], np.ndarray]) -> dict[str, bytes]:
    """short.wav with a second of silence after it, as Ogg and as WebM Opus (mono, 48 kHz)."""
    speech = np.concatenate([clip("short.wav"), np.zeros(16000, dtype=np.float32)])
    return {name: encode(speech, name, "libopus", 48000, channels=1) for name in ("ogg", "webm")}


def pieces(data: bytes, size: int) -> list[bytes]:
    """A file in frames of ``size`` bytes, cut anywhere (as MediaRecorder's timeslices are)."""
    return [data[offset : offset + size] for offset in range(0, len(data), size)]


def heard_short_clip(text: str) -> bool:
    return set(normalize_text(text).split()) >= SHORT_WORDS


def errors_of(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [frame for frame in frames if frame["type"] == "error"]


@pytest.mark.parametrize("audio_format", [AudioFormat.MULAW, AudioFormat.ALAW])
def test_telephone_audio_streams_as_g711_binary_frames(
    server: RunningServer, phone: np.ndarray, manifest: dict[str, Any], audio_format: AudioFormat
) -> None:
    # No sample_rate in the config: G.711 is 8 kHz unless the config says otherwise.
    frames = [encode_g711(phone[i : i + 1600], audio_format) for i in range(0, len(phone), 1600)]
    received, code = exchange(server.ws_url(), config(audio_format=audio_format.value), *frames, STOP)
    assert code == 1000 and not errors_of(received)
    text = received[-1]["text"]
    assert word_error_rate(manifest["phone8k.wav"]["reference"], text) <= PHONE_WER, text
    finals = [frame for frame in received if frame["type"] == "final"]
    # The clip's two sentences end at 3.55 s and 6.95 s of 8 kHz audio: the rate was taken as 8000.
    assert len(finals) == 2 and abs(finals[-1]["end"] - 6.95) < 0.5, finals


def test_mulaw_in_json_audio_frames_streams_too(
    server: RunningServer, phone: np.ndarray, manifest: dict[str, Any]
) -> None:
    result = server.stream(phone, 8000, speed=0, config={"audio_format": "mulaw"})
    assert result.close_code == 1000 and result.error is None
    assert word_error_rate(manifest["phone8k.wav"]["reference"], result.full_transcript or "") <= PHONE_WER


@pytest.mark.parametrize("audio_format", ["float32", "pcm16"])
def test_binary_frames_carry_pcm_after_config(
    server: RunningServer, clip: Callable[[str], np.ndarray], audio_format: str
) -> None:
    result = server.stream(clip("short.wav"), speed=0, config={"audio_format": audio_format}, binary=True)
    assert result.close_code == 1000 and result.error is None
    assert heard_short_clip(result.full_transcript or "")


@pytest.mark.parametrize("container", ["ogg", "webm"])
def test_opus_streams_as_its_pages_arrive(
    server: RunningServer, opus_files: dict[str, bytes], container: str
) -> None:
    """Frames of 1000 bytes (about a quarter second at 32 kbit/s), in binary frames and in JSON ones."""
    frames: list[str | bytes] = [config(audio_format="opus")]
    for index, piece in enumerate(pieces(opus_files[container], 1000)):
        if index % 2:
            frames.append(piece)
        else:
            frames.append(json.dumps({"type": "audio", "data": base64.b64encode(piece).decode()}))
    received, code = exchange(server.ws_url(), *frames, STOP)
    assert code == 1000 and not errors_of(received)
    assert heard_short_clip(received[-1]["text"]), received[-1]
    # Finals come while the stream goes on, not only at its end: decoding keeps up with the pages.
    assert any(frame["type"] == "final" for frame in received[:-1])


def test_garbage_opus_gets_an_error_and_the_next_stream_decodes(
    server: RunningServer, opus_files: dict[str, bytes]
) -> None:
    ogg = opus_files["ogg"]
    received, code = exchange(
        server.ws_url(),
        config(audio_format="opus"),
        b"this is not an ogg page" * 10,
        ogg[:4] + NOISE,  # an Ogg magic number, then more noise than an Ogg page can hold
        *pieces(ogg, 4000),
        STOP,
    )
    assert code == 1000
    errors = errors_of(received)
    assert [error["error_type"] for error in errors] == ["invalid_audio"] * 2, errors
    assert not any(error["fatal"] for error in errors)
    assert "Ogg or WebM" in errors[0]["message"] and "Ogg or WebM" in errors[1]["message"]
    assert heard_short_clip(received[-1]["text"]), received[-1]


def test_bad_binary_frames_get_errors_and_the_session_continues(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    speech = (clip("short.wav") * 32767).astype("<i2").tobytes()
    too_big = b"\0" * (server.settings.streaming.max_frame_bytes + 2)
    received, code = exchange(
        server.ws_url(), config(audio_format="pcm16"), b"\0\0\0", too_big, b"", speech, STOP
    )
    assert code == 1000
    errors = errors_of(received)
    assert [error["error_type"] for error in errors] == ["invalid_audio"] * 2, errors
    assert "multiple of the 2-byte pcm16 sample" in errors[0]["message"]
    assert "larger than" in errors[1]["message"]
    assert heard_short_clip(received[-1]["text"])


def test_binary_frame_before_config_closes_4400(server: RunningServer) -> None:
    received, code = exchange(server.ws_url(), b"\0\0\0\0", config())
    assert code == 4400
    assert received[0]["error_type"] == "bad_request" and received[0]["fatal"] is True
    assert "binary" in received[0]["message"] and "config" in received[0]["message"]


def test_bad_opus_in_one_stream_leaves_another_streaming(
    server: RunningServer, opus_files: dict[str, bytes], phone: np.ndarray, manifest: dict[str, Any]
) -> None:
    garbage = [config(audio_format="opus"), *(b"OggS" + NOISE for _ in range(3)), STOP]
    good = [config(audio_format="mulaw"), *pieces(encode_g711(phone, AudioFormat.MULAW), 1600), STOP]

    async def both() -> list[tuple[list[dict[str, Any]], int | None]]:
        url = server.ws_url()
        return list(await asyncio.gather(_exchange(url, garbage), _exchange(url, good)))

    (bad_frames, bad_code), (good_frames, good_code) = asyncio.run(both())
    assert bad_code == 1000 and good_code == 1000
    assert not errors_of(good_frames)
    assert word_error_rate(manifest["phone8k.wav"]["reference"], good_frames[-1]["text"]) <= PHONE_WER
    assert errors_of(bad_frames) and all(e["error_type"] == "invalid_audio" for e in errors_of(bad_frames))
