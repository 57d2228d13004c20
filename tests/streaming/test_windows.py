"""A window-decoding live session with real VAD and a scripted engine: segmentation, bounds, reset and
backpressure."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from streamscribe.streaming.scheduler import window_scheduler
from streamscribe.streaming.session import (
    FinalText,
    LiveSession,
    PartialText,
    SessionEvent,
    SessionOptions,
)
from streamscribe.streaming.vad import SileroVad, VadOptions
from streamscribe.streaming.windows import window_session
from tests.streaming.fakes import ScriptedEngine


def make_session(
    engine: ScriptedEngine, vad_model: SileroVad, **options: Any
) -> tuple[LiveSession, list[SessionEvent]]:
    events: list[SessionEvent] = []

    async def emit(event: SessionEvent) -> None:
        events.append(event)

    scheduler = window_scheduler(engine)  # type: ignore[arg-type]
    session = window_session(scheduler, vad_model, SessionOptions(**options), emit, engine.sample_rate)  # type: ignore[arg-type]
    return session, events


async def feed_all(session: LiveSession, samples: np.ndarray, chunk: int = 1600) -> None:
    for start in range(0, len(samples), chunk):
        await session.feed(samples[start : start + chunk])


async def test_each_pause_ends_a_final_and_finals_never_overlap(
    vad: SileroVad, clip: Callable[[str], np.ndarray], manifest: dict
) -> None:
    engine = ScriptedEngine()
    session, events = make_session(engine, vad)
    await feed_all(session, clip("long.wav")[: 16000 * 37])
    await session.flush()
    finals = [e for e in events if isinstance(e, FinalText)]
    sentences = [s for s in manifest["long.wav"]["segments"] if s["end"] < 37]
    # Pauses shorter than the VAD's 0.5 s may join two sentences; none is split.
    assert len(sentences) // 2 <= len(finals) <= len(sentences)
    for before, after in itertools.pairwise(finals):
        assert before.end <= after.start
    assert [f.index for f in finals] == list(range(len(finals)))
    for sentence in sentences:
        assert any(f.start <= sentence["start"] and sentence["end"] <= f.end + 0.2 for f in finals), sentence
    await session.close()


async def test_continuous_speech_is_cut_and_memory_stays_bounded(
    vad: SileroVad, clip: Callable[[str], np.ndarray], manifest: dict
) -> None:
    long = clip("long.wav")
    # Two minutes of speech with every pause removed: the VAD never ends the utterance.
    pieces = [long[int(s["start"] * 16000) : int(s["end"] * 16000)] for s in manifest["long.wav"]["segments"]]
    speech = np.concatenate(pieces * 2)
    engine = ScriptedEngine()
    session, events = make_session(engine, vad, max_segment_seconds=8.0)
    peak_backlog = 0.0
    for start in range(0, len(speech), 1600):
        await session.feed(speech[start : start + 1600])
        peak_backlog = max(peak_backlog, session.backlog_seconds())
    await session.flush()
    finals = [e for e in events if isinstance(e, FinalText)]
    assert len(finals) >= len(speech) / 16000 / 8.5
    assert max(len(w.samples) for w in engine.windows) <= 8.5 * 16000
    assert sum(f.end - f.start for f in finals) == pytest.approx(len(speech) / 16000, abs=1.0)
    assert peak_backlog <= 60.0 + 1.0
    await session.close()


async def test_partials_belong_to_the_open_segment(vad: SileroVad, clip: Callable[[str], np.ndarray]) -> None:
    engine = ScriptedEngine()
    session, events = make_session(engine, vad)
    speech = clip("short.wav")
    for start in range(0, len(speech), 1600):
        await session.feed(speech[start : start + 1600])
        await asyncio.sleep(0.01)  # let the decoder run, as live audio would
    await session.flush()
    partials = [e for e in events if isinstance(e, PartialText)]
    finals = [e for e in events if isinstance(e, FinalText)]
    assert partials and len(finals) == 1
    assert {p.index for p in partials} == {finals[0].index}
    assert events.index(partials[-1]) < events.index(finals[0])
    assert not [w for w in engine.windows if not w.final and len(w.samples) < 16000]
    await session.close()


async def test_reset_discards_a_decode_in_flight(vad: SileroVad, clip: Callable[[str], np.ndarray]) -> None:
    engine = ScriptedEngine()
    session, events = make_session(engine, vad)
    engine.gate.clear()
    await feed_all(session, np.concatenate([clip("short.wav"), np.zeros(16000, np.float32)]))
    await asyncio.sleep(0.2)  # the final is now waiting inside the engine
    session.reset()
    engine.gate.set()
    assert await session.flush() == ""
    await asyncio.sleep(0.1)
    assert not [e for e in events if isinstance(e, FinalText)]
    await session.close()


async def test_backpressure_holds_feed_instead_of_dropping_audio(
    vad: SileroVad, clip: Callable[[str], np.ndarray]
) -> None:
    engine = ScriptedEngine()
    engine.gate.clear()
    session, events = make_session(engine, vad, max_backlog_seconds=5.0, enable_partial=False)
    sentence = np.concatenate([clip("short.wav"), np.zeros(16000, np.float32)])
    feeding = asyncio.create_task(feed_all(session, np.tile(sentence, 6)))
    await asyncio.sleep(1.0)
    assert not feeding.done(), "feed should wait while the engine is stuck"
    assert session.backlog_seconds() <= 5.0 + 4.0
    engine.gate.set()
    await asyncio.wait_for(feeding, 30)
    await session.flush()
    assert len([e for e in events if isinstance(e, FinalText)]) == 6
    await session.close()


async def test_the_full_transcript_of_a_stream_kept_open_for_days_stays_bounded(
    vad: SileroVad, clip: Callable[[str], np.ndarray]
) -> None:
    engine = ScriptedEngine()
    session, events = make_session(engine, vad, max_transcript_chars=20)
    sentence = np.concatenate([clip("short.wav"), np.zeros(16000, np.float32)])
    await feed_all(session, np.tile(sentence, 4))
    transcript = await session.flush()
    finals = [e.text for e in events if isinstance(e, FinalText)]
    assert len(finals) == 4 and len(" ".join(finals)) > 20
    kept = [text for i, text in enumerate(finals) if len(" ".join(finals[i:])) <= 20]
    assert transcript == " ".join(kept) and kept  # the newest finals, whole
    await session.close()


async def test_partials_are_not_decoded_again_while_only_silence_comes(
    vad: SileroVad, clip: Callable[[str], np.ndarray]
) -> None:
    engine = ScriptedEngine()
    # A pause the VAD does not end the utterance on: it stays open through 2 s of silence.
    session, _ = make_session(engine, vad, vad=VadOptions(min_silence_ms=3000))
    speech = np.concatenate([clip("short.wav"), np.zeros(16000 * 2, np.float32)])
    spoken = len(clip("short.wav"))
    partials_when_speech_ended = 0
    for start in range(0, len(speech), 1600):
        await session.feed(speech[start : start + 1600])
        await asyncio.sleep(0.01)
        if start < spoken:
            partials_when_speech_ended = len([w for w in engine.windows if not w.final])
    partials = len([w for w in engine.windows if not w.final])
    assert partials_when_speech_ended >= 2
    assert partials <= partials_when_speech_ended + 1  # at most one more: it hears the last words
    await session.close()


async def test_finals_carry_the_streams_recent_text_and_partials_only_the_clients_prompt(
    vad: SileroVad, clip: Callable[[str], np.ndarray]
) -> None:
    engine = ScriptedEngine()
    session, _ = make_session(engine, vad, prompt="Glossary: Kubernetes.")
    speech = clip("long.wav")[: 16000 * 12]
    for start in range(0, len(speech), 1600):
        await session.feed(speech[start : start + 1600])
        await asyncio.sleep(0.01)
    await session.flush()
    finals = [w for w in engine.windows if w.final]
    partials = [w for w in engine.windows if not w.final]
    assert len(finals) >= 2 and partials
    assert finals[0].prompt == "Glossary: Kubernetes." and finals[-1].prompt != finals[0].prompt
    assert {w.prompt for w in partials} == {"Glossary: Kubernetes."}
    await session.close()
