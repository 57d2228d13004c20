"""The OpenAI-compatible file API through the real server, driven by the official ``openai`` client."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import av
import httpx
import jiwer
import numpy as np
import openai
import pytest

from streamscribe.engines import SAMPLE_RATE
from streamscribe.engines.base import AudioWindow, Transcript
from tests.conftest import DATA, RunningServer, normalize_text
from tests.server.ws_helpers import limits, new_key


def client_for(server: RunningServer, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key or server.api_key, max_retries=0)


def encode(samples: np.ndarray, container: str, codec: str, rate: int = 16000) -> bytes:
    """Encode mono float samples with PyAV (no ffmpeg binary involved)."""
    out = io.BytesIO()
    with av.open(out, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame_format = stream.codec_context.format.name  # the codec's preferred sample format
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        step = 1024
        for offset in range(0, len(pcm), step):
            frame = av.AudioFrame.from_ndarray(pcm[None, offset : offset + step], format="s16", layout="mono")
            frame.sample_rate = rate
            if frame_format != "s16":
                frame = av.AudioResampler(format=frame_format, layout="mono", rate=rate).resample(frame)[0]
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return out.getvalue()


def test_transcribes_a_wav_with_the_official_client(server: RunningServer) -> None:
    with (DATA / "short.wav").open("rb") as audio:
        result = client_for(server).audio.transcriptions.create(model="whisper-1", file=audio)
    assert "quarterly report" in normalize_text(result.text)


@pytest.mark.parametrize(
    ("name", "container", "codec", "rate"),
    [
        ("clip.mp3", "mp3", "libmp3lame", 16000),
        ("clip.ogg", "ogg", "libopus", 48000),
        ("clip.flac", "flac", "flac", 16000),
        ("clip.m4a", "ipod", "aac", 16000),
    ],
)
def test_transcribes_compressed_formats(
    server: RunningServer, clip: Callable[[str], np.ndarray], name: str, container: str, codec: str, rate: int
) -> None:
    samples = clip("short.wav")
    if rate != 16000:
        import soxr

        samples = soxr.resample(samples, 16000, rate)
    data = encode(samples, container, codec, rate)
    result = client_for(server).audio.transcriptions.create(model="whisper-1", file=(name, data))
    assert "quarterly report" in normalize_text(result.text), name


def test_text_srt_and_vtt_formats(server: RunningServer) -> None:
    client = client_for(server)
    audio = (DATA / "long.wav").read_bytes()
    text = client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", audio), response_format="text"
    )
    assert isinstance(text, str) and "quarterly report" in normalize_text(text)
    srt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="srt")
    assert re.match(r"1\n00:00:0\d,\d{3} --> 00:00:\d\d,\d{3}\n\S", srt), srt[:80]
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:0") and " --> " in vtt


def test_verbose_json_with_segments_and_words(server: RunningServer) -> None:
    with (DATA / "long.wav").open("rb") as audio:
        result = client_for(server).audio.transcriptions.create(
            model="whisper-1",
            file=audio,
            language="en",
            response_format="verbose_json",
            timestamp_granularities=["segment", "word"],
        )
    assert result.language == "en" and result.duration > 30
    assert result.segments and result.words
    assert [s.id for s in result.segments] == list(range(len(result.segments)))
    assert all(s.start < s.end for s in result.segments)
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and result.words[-1].end <= result.duration + 0.01
    assert normalize_text(" ".join(w.word for w in result.words)) == normalize_text(result.text)


def test_translation_of_spanish_to_english(server: RunningServer) -> None:
    with (DATA / "es.wav").open("rb") as audio:
        result = client_for(server).audio.translations.create(model="whisper-1", file=audio)
    text = normalize_text(result.text)
    assert "train" in text and "hospital" in text, text


def test_prompt_is_accepted_and_spanish_transcribed(server: RunningServer) -> None:
    with (DATA / "es.wav").open("rb") as audio:
        result = client_for(server).audio.transcriptions.create(
            model="whisper-1", file=audio, language="es", prompt="Estación de tren.", temperature=0.0
        )
    assert "hospital" in normalize_text(result.text)


def test_models_lists_whisper_1(server: RunningServer) -> None:
    ids = [model.id for model in client_for(server).models.list()]
    assert "whisper-1" in ids and "whisper-standard" in ids


def test_wrong_key_is_401(server: RunningServer) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client_for(server, key="nope").models.list()
    assert "invalid API key" in str(caught.value)


def test_a_file_that_is_not_audio_is_400_with_a_reason(server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).audio.transcriptions.create(
            model="whisper-1", file=("notes.mp3", b"not audio" * 100)
        )
    body: Any = caught.value.body
    assert body["code"] == "invalid_audio" and "could not decode" in body["message"]
    assert "/tmp" not in body["message"], "no server paths in errors"


def test_unknown_model_and_bad_format_are_400(server: RunningServer) -> None:
    audio = (DATA / "short.wav").read_bytes()
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).audio.transcriptions.create(model="gpt-9", file=("a.wav", audio))
    assert "unknown model" in str(caught.value)
    response = httpx.post(
        f"{server.base_url}/v1/audio/transcriptions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        files={"file": ("a.wav", audio)},
        data={"model": "whisper-1", "response_format": "docx"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    missing = httpx.post(
        f"{server.base_url}/v1/audio/transcriptions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        data={"model": "whisper-1"},
    )
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"


def test_an_unknown_route_is_404_in_openais_shape(server: RunningServer) -> None:
    response = httpx.get(
        f"{server.base_url}/v1/nothing", headers={"Authorization": f"Bearer {server.api_key}"}
    )
    assert response.status_code == 404 and response.json()["error"]["message"] == "Not Found"


def test_an_unavailable_model_falls_back_and_an_unknown_language_is_400(
    server: RunningServer, captured_logs: list[str]
) -> None:
    audio = (DATA / "short.wav").read_bytes()
    result = client_for(server).audio.transcriptions.create(model="parakeet-onnx", file=("a.wav", audio))
    assert "quarterly report" in normalize_text(result.text)
    assert any("parakeet (onnx) is unavailable here" in line for line in captured_logs)
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).audio.transcriptions.create(
            model="whisper-1", file=("a.wav", audio), language="xx"
        )
    body: Any = caught.value.body
    assert body["param"] == "language" and "language 'xx'" in body["message"]


class _PromptRecorder:
    """Answers every window with the same five words and keeps the prompts it was given."""

    name = "whisper-recorder"
    sample_rate = SAMPLE_RATE
    languages = frozenset({"en"})

    def __init__(self) -> None:
        self.prompts: list[str | None] = []

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        self.prompts += [window.prompt for window in batch]
        return [Transcript("one two three four five", "en") for _ in batch]


def test_files_take_their_prompt_window_from_the_settings(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(preload=False, streaming={"prompt_chars": 9})
    engine = _PromptRecorder()
    server.app.state.runtime.registry.get = lambda *choice: engine
    with (DATA / "long.wav").open("rb") as audio:
        client_for(server).audio.transcriptions.create(model="whisper-1", file=audio)
    assert len(engine.prompts) > 2 and engine.prompts[0] is None
    assert set(engine.prompts[1:]) == {"four five"}


def test_files_over_the_size_limit_are_413(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(max_upload_bytes=50_000, preload=False)
    # short.wav is over the limit but its request is not: refused after parsing. long.wav's request
    # is refused from its Content-Length, before its body is read.
    for name in ("short.wav", "long.wav"):
        with pytest.raises(openai.APIStatusError) as caught:
            client_for(server).audio.transcriptions.create(
                model="whisper-1", file=(name, (DATA / name).read_bytes())
            )
        assert caught.value.status_code == 413, name
        assert "larger than the limit of 50000 bytes" in json.dumps(caught.value.body)


def test_files_use_the_keys_quota_like_streams(
    make_server: Callable[..., RunningServer], clip: Callable[[str], np.ndarray], tmp_path: Path
) -> None:
    server = make_server(
        auth_mode="multi_user",
        data_dir=tmp_path / "data",
        tiers={"free": {"daily_minutes": 0.1, "concurrent_streams": 1}},
    )
    key = new_key(server, "alice", tier="free")
    with (DATA / "short.wav").open("rb") as audio:
        result = client_for(server, key).audio.transcriptions.create(model="whisper-1", file=audio)
    assert "quarterly report" in normalize_text(result.text)
    used = limits(server, key)["used_today_minutes"]
    assert abs(used - len(clip("short.wav")) / 16000 / 60) < 0.002
    # 0.1 minutes a day: the 78 s clip does not fit, and is refused before any decoding.
    with pytest.raises(openai.APIStatusError) as caught, (DATA / "long.wav").open("rb") as audio:
        client_for(server, key).audio.transcriptions.create(model="whisper-1", file=audio)
    assert caught.value.status_code == 429
    assert "quota_exceeded" in json.dumps(caught.value.body)
    with pytest.raises(openai.AuthenticationError):
        client_for(server, "ssk_000000000000_" + "x" * 43).models.list()


def test_a_minute_of_speech_without_pauses_is_transcribed_whole(
    server: RunningServer, manifest: dict[str, Any]
) -> None:
    # One VAD span of 56 s once went to Whisper as one window and failed with a 500.
    with (DATA / "continuous.wav").open("rb") as audio:
        result = client_for(server).audio.transcriptions.create(
            model="whisper-1", file=audio, response_format="verbose_json"
        )
    reference = normalize_text(manifest["continuous.wav"]["reference"])
    assert jiwer.wer(reference, normalize_text(result.text)) <= 0.12
    segments = result.segments or []
    assert len(segments) >= 3 and segments[-1].end >= 55
