"""NativeStreamingSession corners with a fake streaming engine: every engine stream is closed exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np

from streamscribe.engines.base import AudioWindow, StreamChunk, StreamUpdate, Transcript
from streamscribe.streaming.native import NativeStreamingSession, StreamStepper
from streamscribe.streaming.session import FinalSegment, SessionEvent, SessionOptions
from streamscribe.streaming.vad import SileroVad


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

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        raise AssertionError("a native session never re-decodes windows")

    def stream_step(self, chunks: Sequence[StreamChunk]) -> list[StreamUpdate]:
        updates = []
        for chunk in chunks:
            assert 0 < len(chunk.samples) <= self.chunk_samples
            if chunk.is_first:
                assert chunk.stream_id not in self.pieces
                self.opened.append(chunk.stream_id)
            else:  # like NeMo, which keeps no state for streams it has not opened or already closed
                assert chunk.stream_id in self.pieces and chunk.stream_id not in self.closed
            self.pieces[chunk.stream_id] = self.pieces.get(chunk.stream_id, 0) + 1
            text = " ".join(f"w{i}" for i in range(self.pieces[chunk.stream_id]))
            if chunk.is_last:
                self.closed.append(chunk.stream_id)
                updates.append(StreamUpdate(chunk.stream_id, text, ""))
            else:
                updates.append(StreamUpdate(chunk.stream_id, "", text))
        return updates


def run_session(
    engine: CountingEngine, script: Callable[[NativeStreamingSession], object]
) -> tuple[list[SessionEvent], object]:
    events: list[SessionEvent] = []

    async def main() -> object:
        async def emit(event: SessionEvent) -> None:
            events.append(event)

        stepper = StreamStepper(engine)
        session = NativeStreamingSession(stepper, SileroVad(), SessionOptions(partial_interval=0.1), emit)
        try:
            return await script(session)  # type: ignore[misc]
        finally:
            await session.close()
            await stepper.close()

    return events, asyncio.run(main())


def test_each_utterance_is_one_engine_stream_and_one_final(clip: Callable[[str], np.ndarray]) -> None:
    speech = np.concatenate([clip("short.wav"), np.zeros(16000, np.float32)])

    async def script(session: NativeStreamingSession) -> str:
        for start in range(0, len(speech), 1600):
            await session.feed(speech[start : start + 1600])
        return await session.flush()

    engine = CountingEngine()
    events, transcript = run_session(engine, script)
    finals = [e for e in events if isinstance(e, FinalSegment)]
    assert len(finals) == len(engine.opened) == 1
    assert engine.opened == engine.closed
    assert transcript == finals[0].text == " ".join(f"w{i}" for i in range(engine.pieces[engine.opened[0]]))


def test_reset_mid_utterance_closes_the_engine_stream(clip: Callable[[str], np.ndarray]) -> None:
    speech = clip("short.wav")

    engine = CountingEngine()

    async def script(session: NativeStreamingSession) -> str:
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
    assert not [e for e in events if isinstance(e, FinalSegment)]


def test_closing_mid_utterance_closes_the_engine_stream(clip: Callable[[str], np.ndarray]) -> None:
    """A client that disconnects mid-sentence must not leave state (a cache slot) in the engine."""
    speech = clip("short.wav")
    engine = CountingEngine()

    async def script(session: NativeStreamingSession) -> None:
        for start in range(0, len(speech) // 2, 1600):
            await session.feed(speech[start : start + 1600])
        for _ in range(200):
            if engine.opened:
                break
            await asyncio.sleep(0.01)

    run_session(engine, script)  # run_session closes the session when the script returns
    assert engine.opened and engine.opened == engine.closed
