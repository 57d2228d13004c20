"""End to end through the real server, socket and bundled tiny.en model: what a streaming client sees."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jiwer
import numpy as np
import soxr

from tests.conftest import RunningServer, normalize_text


def test_long_clip_streams_with_partials_then_accurate_finals(
    server: RunningServer, clip: Callable[[str], np.ndarray], manifest: dict[str, Any]
) -> None:
    result = server.stream(clip("long.wav"), speed=4.0)

    assert result.close_code == 1000
    kinds = [f.frame["type"] for f in result.frames]
    assert kinds[:2] == ["status", "status"]
    assert [result.frames[0].frame["state"], result.frames[1].frame["state"]] == ["configured", "ready"]
    assert kinds[-1] == "full_transcript"
    partials, finals = result.of_type("partial"), result.of_type("final")
    assert partials and finals
    assert kinds.index("partial") < kinds.index("final")
    assert {f["model"] for f in partials + finals} == {"whisper-tiny.en"}
    assert all(f["is_final"] for f in finals) and not any(p["is_final"] for p in partials)

    reference = normalize_text(manifest["long.wav"]["reference"])
    hypothesis = normalize_text(result.full_transcript or "")
    assert jiwer.wer(reference, hypothesis) <= 0.15
    assert result.full_transcript == " ".join(f["text"] for f in finals)

    ids = [f["segment_id"] for f in finals]
    assert ids == sorted(set(ids))
    for before, after in itertools.pairwise(finals):
        assert before["end"] <= after["start"] + 1e-6, "finals overlap in time"
        last, first = normalize_text(before["text"]).split()[-1], normalize_text(after["text"]).split()[0]
        assert last != first, f"word repeated at a border: {before['text']!r} | {after['text']!r}"


def test_words_two_partials_agree_on_are_never_withdrawn(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    result = server.stream(clip("long.wav")[: 16000 * 20], speed=2.0)

    by_segment: dict[int, list[list[str]]] = {}
    for partial in result.of_type("partial"):
        by_segment.setdefault(partial["segment_id"], []).append(normalize_text(partial["text"]).split())
    assert by_segment
    for partials in by_segment.values():
        # LocalAgreement: once consecutive partials agree on a prefix, every later partial keeps it.
        for n in range(1, len(partials)):
            agreed = _common_prefix(partials[n - 1], partials[n])
            for later in partials[n + 1 :]:
                assert later[: len(agreed)] == agreed, (agreed, later)


def _common_prefix(a: list[str], b: list[str]) -> list[str]:
    prefix = []
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        prefix.append(x)
    return prefix


def test_silence_and_noise_give_no_text(server: RunningServer, clip: Callable[[str], np.ndarray]) -> None:
    for name in ("silence.wav", "noise.wav"):
        result = server.stream(clip(name), speed=0)
        assert result.close_code == 1000
        assert result.of_type("partial") == [] and result.of_type("final") == [], name
        assert result.full_transcript == ""


def test_commit_flushes_unfinished_audio(server: RunningServer, clip: Callable[[str], np.ndarray]) -> None:
    speech = clip("short.wav")
    # Cut right after the last word: no trailing silence, so only the commit can end the utterance.
    result = server.stream(speech[: int(16000 * 2.9)], speed=0, finish="commit")

    finals = result.of_type("final")
    assert len(finals) == 1
    assert "quarterly report" in normalize_text(finals[0]["text"])
    kinds = [f.frame["type"] for f in result.frames]
    assert kinds.index("final") < kinds.index("full_transcript")
    assert result.full_transcript == finals[0]["text"]


def test_reset_drops_buffer_and_history(server: RunningServer, clip: Callable[[str], np.ndarray]) -> None:
    import asyncio
    import base64
    import json

    from websockets.asyncio.client import connect

    speech = clip("short.wav")

    async def scenario() -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        async with connect(server.ws_url()) as ws:
            await ws.send(json.dumps({"type": "config"}))
            audio = base64.b64encode(speech.astype("<f4").tobytes()).decode()
            await ws.send(json.dumps({"type": "audio", "data": audio}))
            await ws.send(json.dumps({"type": "commit"}))
            await ws.send(json.dumps({"type": "reset"}))
            await ws.send(json.dumps({"type": "commit"}))
            await ws.send(json.dumps({"type": "stop"}))
            async for raw in ws:
                frames.append(json.loads(raw))
        return frames

    frames = asyncio.run(scenario())
    transcripts = [f["text"] for f in frames if f["type"] == "full_transcript"]
    assert len(transcripts) == 3
    assert "quarterly report" in normalize_text(transcripts[0])
    assert transcripts[1:] == ["", ""]
    assert {"type": "status", "state": "reset"}.items() <= next(
        f for f in frames if f.get("state") == "reset"
    ).items()


def test_other_sample_rates_are_resampled(server: RunningServer, clip: Callable[[str], np.ndarray]) -> None:
    speech = clip("short.wav")
    for rate in (8000, 48000):
        resampled = soxr.resample(speech, 16000, rate).astype(np.float32)
        result = server.stream(resampled, rate=rate, speed=0)
        assert result.close_code == 1000
        assert "quarterly report" in normalize_text(result.full_transcript or ""), rate


def test_pcm16_audio_format(server: RunningServer, clip: Callable[[str], np.ndarray]) -> None:
    result = server.stream(clip("short.wav"), speed=0, config={"audio_format": "pcm16"})
    assert "finance team" in normalize_text(result.full_transcript or "")


def test_spanish_uses_the_multilingual_model(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    result = server.stream(clip("es.wav"), speed=0, config={"language": "es"})
    ready = [f for f in result.of_type("status") if f["state"] == "ready"]
    assert ready[0]["model"] == "whisper-base"
    finals = result.of_type("final")
    assert finals and all(f["language"] == "es" and f["model"] == "whisper-base" for f in finals)
    text = normalize_text(result.full_transcript or "")
    assert "tren" in text and "hospital" in text


def test_speech_without_long_pauses_gets_a_final_every_sentence_or_two(
    server: RunningServer, clip: Callable[[str], np.ndarray], manifest: dict[str, Any]
) -> None:
    speech = clip("continuous.wav")[: 16000 * 30]
    sentences = [s for s in manifest["continuous.wav"]["segments"] if s["end"] <= 30]
    result = server.stream(speech, speed=0, config={"enable_partial": False})

    finals = result.of_type("final")
    # Closed in the breaths between sentences, not every 15 s at the length limit.
    assert len(finals) >= len(sentences) // 3
    assert all(final["end"] - final["start"] <= 10.0 for final in finals)
    reference = normalize_text(" ".join(s["text"] for s in sentences))
    assert jiwer.wer(reference, normalize_text(result.full_transcript or "")) <= 0.12


def test_ten_minutes_without_a_pause_keep_giving_finals_with_nothing_lost_or_repeated(
    make_server: Callable[..., RunningServer], clip: Callable[[str], np.ndarray], manifest: dict[str, Any]
) -> None:
    from streamscribe.engines.repetition import find_repeated_run, spoken_words

    server = make_server(streaming={"max_audio_speed": 0})  # as fast as the engine goes, not 4x real time
    passes = 11  # 56 s of speech with no pause the VAD ends an utterance on, 11 times: over 10 minutes
    speech = np.tile(clip("continuous.wav"), passes)
    result = server.stream(speech, speed=0, frame_seconds=0.5, config={"enable_partial": False}, timeout=600)

    assert result.close_code == 1000
    finals = result.of_type("final")
    assert len(finals) >= 4 * passes
    for final in finals:
        assert final["end"] - final["start"] <= 15.0
        assert find_repeated_run(spoken_words(final["text"])) is None, final["text"]
    # Cut where the speech is quietest, each cut utterance ends where the next begins: none is lost.
    covered = sum(final["end"] - final["start"] for final in finals)
    assert covered >= 0.97 * len(speech) / 16000
    reference = " ".join([normalize_text(manifest["continuous.wav"]["reference"])] * passes)
    assert jiwer.wer(reference, normalize_text(result.full_transcript or "")) <= 0.12
