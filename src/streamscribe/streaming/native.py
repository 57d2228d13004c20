"""Live streams for engines that stream natively (NeMo's pipeline): audio goes in once, piece by piece.

The VAD cuts utterances exactly as in ``StreamingSession``; each utterance is one stream inside the
engine, fed in ``chunk_samples`` pieces as audio arrives, so the engine carries its own decoder state
instead of re-decoding a growing window. The engine's text for the open utterance is the partial; when
the utterance ends, its last piece closes the engine's stream and the whole text becomes the final.
A ``StreamStepper`` per engine puts the waiting piece of every live stream into one engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from streamscribe.audio import AudioBuffer
from streamscribe.engines.base import StreamChunk, StreamingEngine, StreamUpdate
from streamscribe.streaming.session import (
    FinalSegment,
    PartialText,
    SessionCore,
    SessionEvent,
    SessionOptions,
)
from streamscribe.streaming.vad import SileroVad, SpeechEnd, SpeechStart, VadStream

log = logging.getLogger(__name__)


class StreamStepper:
    """Runs a streaming engine's steps in one worker thread; every stream waiting joins the next step."""

    def __init__(self, engine: StreamingEngine) -> None:
        self.engine = engine
        self._ids = itertools.count()
        self._waiting: list[tuple[StreamChunk, asyncio.Future[StreamUpdate]]] = []
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stream-{engine.name}")

    def new_stream_id(self) -> int:
        return next(self._ids)

    async def step(self, chunk: StreamChunk) -> StreamUpdate:
        """Queue one piece and wait for what it added to its stream (engine errors are raised here)."""
        if self._ready is None:
            self._ready = asyncio.Event()
            self._task = asyncio.create_task(self._work())
        future: asyncio.Future[StreamUpdate] = asyncio.get_running_loop().create_future()
        self._waiting.append((chunk, future))
        self._ready.set()
        return await future

    async def _work(self) -> None:
        assert self._ready is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._ready.clear()
                await self._ready.wait()
            # A piece whose session went away still takes part: it may open or close the engine's
            # state for its stream. A stream appears once per step; a second piece waits for the next.
            batch: list[tuple[StreamChunk, asyncio.Future[StreamUpdate]]] = []
            later: list[tuple[StreamChunk, asyncio.Future[StreamUpdate]]] = []
            for item in self._waiting:
                (later if any(item[0].stream_id == c.stream_id for c, _ in batch) else batch).append(item)
            self._waiting = later
            try:
                updates = await loop.run_in_executor(
                    self._executor, self.engine.stream_step, [chunk for chunk, _ in batch]
                )
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), update in zip(batch, updates, strict=True):
                if not future.done():
                    future.set_result(update)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Utterance:
    """One VAD utterance = one stream inside the engine."""

    segment_id: int
    stream_id: int
    start: int
    fed_to: int
    generation: int
    end: int | None = None
    discard: bool = False
    opened: bool = False
    closed: bool = False
    final_parts: list[str] = field(default_factory=list)
    partial: str = ""

    @property
    def text(self) -> str:
        return " ".join(part for part in [*self.final_parts, self.partial] if part)


@dataclass
class _Piece:
    utterance: _Utterance
    samples: np.ndarray
    end: int
    is_last: bool


class NativeStreamingSession(SessionCore):
    """Same surface and events as ``StreamingSession``, for a ``StreamingEngine``."""

    def __init__(
        self,
        stepper: StreamStepper,
        vad: SileroVad,
        options: SessionOptions,
        emit: Callable[[SessionEvent], Awaitable[None]],
    ) -> None:
        rate = stepper.engine.sample_rate
        super().__init__(rate, options, emit)
        self._vad = VadStream(vad, options.vad)
        self._pad = options.vad.speech_pad_ms * rate // 1000
        self._min_speech = options.vad.min_speech_ms * rate // 1000
        self._max_segment = int(options.max_segment_seconds * rate)
        self._buffer = AudioBuffer()
        self._stepper = stepper
        self._chunk = stepper.engine.chunk_samples
        self._open: _Utterance | None = None
        self._pieces: deque[_Piece] = deque()
        self._engine_streams: set[int] = set()  # opened in the engine and not closed yet
        self._last_partial_at = 0

    @property
    def received_seconds(self) -> float:
        return self._buffer.end / self._rate

    @property
    def in_utterance(self) -> bool:
        """True while speech has started and not yet ended (an utterance is open)."""
        return self._open is not None

    def backlog_seconds(self) -> float:
        return sum(len(piece.samples) for piece in self._pieces) / self._rate

    def _has_queued_work(self) -> bool:
        return bool(self._pieces)

    async def feed(self, samples: np.ndarray) -> None:
        """Add audio; waits (backpressure) while too much audio is waiting for the engine."""
        await self._wait_for_room()
        self._buffer.append(samples)
        for event in self._vad.process(samples):
            if isinstance(event, SpeechStart) and self._open is None:
                self._open_utterance(max(self._buffer.start, event.sample - self._pad))
            elif isinstance(event, SpeechEnd) and self._open is not None:
                if event.duration < self._min_speech:
                    self._close_utterance(self._buffer.end, discard=True)
                else:
                    self._close_utterance(min(event.sample + self._pad, self._buffer.end))
        if self._open is not None:
            if self._buffer.end - self._open.start >= self._max_segment:
                # Audio already went to the engine, so cut where it is now, and keep streaming the rest.
                self._close_utterance(self._buffer.end)
                self._open_utterance(self._buffer.end)
            else:
                self._queue_full_pieces(self._open)
        keep_from = self._open.fed_to if self._open is not None else self._buffer.end - self._pad
        self._buffer.trim_before(min(keep_from, self._buffer.end - self._pad))
        self._wake.set()

    async def flush(self) -> str:
        """Finish everything received so far: emit its finals, then return the full transcript."""
        if self._open is not None:
            short = self._buffer.end - self._open.start < self._min_speech
            self._close_utterance(self._buffer.end, discard=short)
        if self._pieces:
            self._idle.clear()
            self._wake.set()
        await self._idle.wait()
        return self.full_transcript

    def reset(self) -> None:
        """Drop buffered audio, pending work and the transcript; the stream's clock keeps running."""
        self._generation += 1
        orphans = {piece.utterance.stream_id: piece.utterance for piece in self._pieces}
        if self._open is not None:
            orphans[self._open.stream_id] = self._open
        self._pieces.clear()
        self._open = None
        for utterance in orphans.values():
            if utterance.opened and not utterance.closed:
                # The engine holds state for this stream: close it, and ignore what it says.
                utterance.discard = True
                self._pieces.append(_Piece(utterance, np.zeros(1, np.float32), utterance.fed_to, True))
        position = self._buffer.end
        self._buffer.clear(position)
        self._vad.reset(position)
        self._finals.clear()
        self._next_segment_id = 0
        self._drained.set()
        if self._pieces:
            self._idle.clear()
            self._wake.set()
        else:
            self._idle.set()

    async def close(self) -> None:
        """Stop decoding, and close the streams the engine still holds for this session."""
        await super().close()
        for stream_id in list(self._engine_streams):
            with contextlib.suppress(Exception):
                await self._stepper.step(StreamChunk(stream_id, np.zeros(1, np.float32), False, True))
        self._engine_streams.clear()

    def _open_utterance(self, start: int) -> None:
        self._open = _Utterance(
            self._next_segment_id, self._stepper.new_stream_id(), start, start, self._generation
        )
        self._last_partial_at = start
        self._last_partial = ""

    def _queue_full_pieces(self, utterance: _Utterance) -> None:
        """Queue whole pieces, always leaving at least one sample so the closing piece is never empty."""
        while self._buffer.end - utterance.fed_to > self._chunk:
            self._queue_piece(utterance, utterance.fed_to + self._chunk, is_last=False)

    def _queue_piece(self, utterance: _Utterance, end: int, is_last: bool) -> None:
        # Never an empty piece: an engine cannot close a stream on nothing.
        samples = (
            self._buffer.slice(utterance.fed_to, end) if end > utterance.fed_to else np.zeros(1, np.float32)
        )
        self._pieces.append(_Piece(utterance, samples, end, is_last))
        utterance.fed_to = end
        self._idle.clear()

    def _close_utterance(self, end: int, discard: bool = False) -> None:
        utterance = self._open
        assert utterance is not None
        self._open = None
        # The engine may already have more audio than the VAD's end (a piece went before the silence
        # was known): then the utterance ends where its audio ends.
        end = end if end > utterance.fed_to else self._buffer.end
        utterance.end = end
        utterance.discard = discard
        if not discard:
            self._next_segment_id += 1
        if discard and utterance.fed_to == utterance.start:
            return  # nothing went to the engine
        while end - utterance.fed_to > self._chunk:
            self._queue_piece(utterance, utterance.fed_to + self._chunk, is_last=False)
        self._queue_piece(utterance, end, is_last=True)

    async def _decode_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pieces:
                piece = self._pieces.popleft()
                self._drained.set()
                await self._decode_piece(piece)
            self._idle.set()

    async def _decode_piece(self, piece: _Piece) -> None:
        utterance = piece.utterance
        chunk = StreamChunk(
            utterance.stream_id, piece.samples, not utterance.opened, piece.is_last, self._options.language
        )
        utterance.opened = True
        # Handed to the stepper, a piece always reaches the engine, even if this session is closed
        # while it waits: so a stream counts as closed as soon as its last piece is handed over.
        if piece.is_last:
            utterance.closed = True
            self._engine_streams.discard(utterance.stream_id)
        else:
            self._engine_streams.add(utterance.stream_id)
        update = await self._stepper.step(chunk)
        if update.final_text:
            utterance.final_parts.append(update.final_text)
        utterance.partial = update.partial_text
        if utterance.discard or utterance.generation != self._generation:
            return
        text = utterance.text
        start = utterance.start / self._rate
        if piece.is_last:
            if text:
                self._finals.append(text)
                assert utterance.end is not None
                await self._emit(
                    FinalSegment(
                        utterance.segment_id, text, start, utterance.end / self._rate, self._options.language
                    )
                )
        elif (
            self._options.enable_partial
            and text
            and text != self._last_partial
            and piece.end - self._last_partial_at >= self._partial_step
            and self._open is utterance
        ):
            self._last_partial_at = piece.end
            self._last_partial = text
            await self._emit(PartialText(utterance.segment_id, text, start, piece.end / self._rate))
