"""Native-stream session corners with a fake streaming engine: every engine stream is closed exactly once."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from streamscribe.engines.base import AudioWindow, EngineStream, StreamUpdate, Transcript
from streamscribe.streaming.native import native_session
from streamscribe.streaming.scheduler import stream_scheduler
from streamscribe.streaming.session import FinalText, LiveSession, SessionEvent, SessionOptions
from streamscribe.streaming.vad import SileroVad


class CountingStream:
    def __init__(self, engine: CountingEngine, number: int) -> None:
        self.engine = engine
        self.number = number
        self.finishing = False
        self.closed = False

    def finish(self) -> None:
        self.finishing = True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.engine.free(self.number)


class CountingEngine:
    """Says "w<n>" for the n-th piece of each stream; records how streams open and close."""

    name = "fake-streaming"
    sample_rate = 16000
    languages = frozenset({"en"})
    chunk_samples = 4000

    def __init__(self) -> None:
        self.opened: list[int] = []
        self.closed: list[int] = []
        self.pieces: dict[int, int] = {}
        self.samples = 0  # audio stepped, over all streams
        self._numbers = itertools.count()

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        raise AssertionError("a native session never re-decodes windows")

    def open_stream(self, language: str) -> CountingStream:
        return CountingStream(self, next(self._numbers))

    def free(self, number: int) -> None:
        """The state of a stream that was opened and not closed yet is dropped (as NeMo's would be)."""
        if number in self.pieces and number not in self.closed:
            self.closed.append(number)

    def stream_step(self, pieces: Sequence[tuple[EngineStream, np.ndarray]]) -> list[StreamUpdate]:
        updates = []
        for stream, samples in pieces:
            assert isinstance(stream, CountingStream)
            assert len(samples) <= self.chunk_samples
            assert len(samples) == self.chunk_samples or stream.finishing, "only a last piece may be short"
            if stream.closed:
                updates.append(StreamUpdate("", ""))
                continue
            number = stream.number
            if number not in self.pieces:
                self.opened.append(number)
            assert number not in self.closed, "a piece after its stream was closed"
            self.pieces[number] = self.pieces.get(number, 0) + 1
            self.samples += len(samples)
            text = " ".join(f"w{i}" for i in range(self.pieces[number]))
            if stream.finishing:
                self.closed.append(number)
                updates.append(StreamUpdate(text, ""))
            else:
                updates.append(StreamUpdate("", text))
        return updates


def run_session(
    engine: CountingEngine, script: Callable[[LiveSession], object], max_segment_seconds: float = 15.0
) -> tuple[list[SessionEvent], object]:
    events: list[SessionEvent] = []

    async def main() -> object:
        async def emit(event: SessionEvent) -> None:
            events.append(event)

        scheduler = stream_scheduler(engine)
        options = SessionOptions(partial_interval=0.1, max_segment_seconds=max_segment_seconds)
        session = native_session(engine, scheduler, SileroVad(), options, emit)
        try:
            return await script(session)  # type: ignore[misc]
        finally:
            await session.close()
            await scheduler.close()

    return events, asyncio.run(main())


def test_each_utterance_is_one_engine_stream_and_one_final(clip: Callable[[str], np.ndarray]) -> None:
    speech = np.concatenate([clip("short.wav"), np.zeros(16000, np.float32)])

    async def script(session: LiveSession) -> str:
        for start in range(0, len(speech), 1600):
            await session.feed(speech[start : start + 1600])
        return await session.flush()

    engine = CountingEngine()
    events, transcript = run_session(engine, script)
    finals = [e for e in events if isinstance(e, FinalText)]
    assert len(finals) == len(engine.opened) == 1
    assert engine.opened == engine.closed
    assert transcript == finals[0].text == " ".join(f"w{i}" for i in range(engine.pieces[engine.opened[0]]))


def test_reset_mid_utterance_closes_the_engine_stream(clip: Callable[[str], np.ndarray]) -> None:
    speech = clip("short.wav")

    engine = CountingEngine()

    async def script(session: LiveSession) -> str:
        for start in range(0, len(speech) // 2, 1600):
            await session.feed(speech[start : start + 1600])
        for _ in range(200):  # let the engine open the utterance's stream
            if engine.opened:
                break
            await asyncio.sleep(0.01)
        session.reset()
        return await session.flush()

    events, transcript = run_session(engine, script)
    assert engine.opened and engine.opened == engine.closed
    assert transcript == ""
    assert not [e for e in events if isinstance(e, FinalText)]


def test_closing_mid_utterance_closes_the_engine_stream(clip: Callable[[str], np.ndarray]) -> None:
    """A client that disconnects mid-sentence must not leave state (a cache slot) in the engine."""
    speech = clip("short.wav")
    engine = CountingEngine()

    async def script(session: LiveSession) -> None:
        for start in range(0, len(speech) // 2, 1600):
            await session.feed(speech[start : start + 1600])
        for _ in range(200):
            if engine.opened:
                break
            await asyncio.sleep(0.01)

    run_session(engine, script)  # run_session closes the session when the script returns
    assert engine.opened and engine.opened == engine.closed


def test_unbroken_speech_is_cut_into_streams_and_no_audio_reaches_the_engine_twice(
    clip: Callable[[str], np.ndarray],
) -> None:
    speech = clip("continuous.wav")  # 56 s without a pause the VAD ends an utterance on

    async def script(session: LiveSession) -> str:
        for start in range(0, len(speech), 1600):
            await session.feed(speech[start : start + 1600])
        return await session.flush()

    engine = CountingEngine()
    events, _ = run_session(engine, script, max_segment_seconds=8.0)
    finals = [e for e in events if isinstance(e, FinalText)]
    assert len(finals) >= len(speech) / 16000 / 8.5
    assert engine.opened == engine.closed
    for before, after in itertools.pairwise(finals):
        assert before.end <= after.start
    # Every stream but its last piece got whole pieces, and the streams share no audio.
    assert engine.samples <= len(speech)
    assert engine.samples >= sum(f.end - f.start for f in finals) * 16000 - 1
