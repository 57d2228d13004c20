"""Utterances as engine streams, for engines that stream natively (NeMo's pipeline): audio goes in once.

Each utterance is one ``EngineStream``, fed in ``chunk_samples`` pieces as its audio arrives, so the
engine carries its own decoder state instead of re-decoding a growing window. The engine's text for the
open utterance is the partial; the step of its last piece makes all of it final.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from streamscribe.engines.base import EngineStream, StreamingEngine, StreamUpdate
from streamscribe.streaming.scheduler import Scheduler, StreamPiece
from streamscribe.streaming.segmenter import Closed, Dropped, Grew, Opened, Segmenter, UtteranceEvent
from streamscribe.streaming.session import (
    FinalText,
    LiveSession,
    PartialText,
    SessionEvent,
    SessionOptions,
)
from streamscribe.streaming.vad import SileroVad


def native_session(
    engine: StreamingEngine,
    scheduler: Scheduler[StreamPiece, StreamUpdate],
    vad: SileroVad,
    options: SessionOptions,
    emit: Callable[[SessionEvent], Awaitable[None]],
) -> LiveSession:
    """A live session whose utterances are streams of ``engine``, stepped through ``scheduler``."""
    segmenter = Segmenter(vad, options.vad, options.max_segment_seconds, engine.sample_rate)
    decoder = NativeStreamDecoder(engine, scheduler, options, engine.sample_rate)
    return LiveSession(segmenter, decoder, options, emit)


@dataclass
class _UtteranceStream:
    """One utterance and the engine stream it goes to."""

    index: int
    start: int
    stream: EngineStream
    queued_to: int  # absolute: audio before this is in pieces for the engine
    held: np.ndarray  # audio from ``queued_to`` on, less than a piece of it
    end: int | None = None  # set when it closes
    dropped: bool = False
    final_parts: list[str] = field(default_factory=list)
    partial: str = ""

    @property
    def received_to(self) -> int:
        return self.queued_to + len(self.held)

    @property
    def text(self) -> str:
        return " ".join(part for part in [*self.final_parts, self.partial] if part)


@dataclass(frozen=True)
class _Piece:
    utterance: _UtteranceStream
    samples: np.ndarray
    end: int  # absolute index just after its last sample
    last: bool


class NativeStreamDecoder:
    """A session's ``UtteranceDecoder`` that steps one engine stream per utterance."""

    def __init__(
        self,
        engine: StreamingEngine,
        scheduler: Scheduler[StreamPiece, StreamUpdate],
        options: SessionOptions,
        rate: int,
    ) -> None:
        self._engine = engine
        self._scheduler = scheduler
        self._options = options
        self._rate = rate
        self._chunk = engine.chunk_samples
        self._partial_step = int(options.partial_interval * rate)
        self._open: _UtteranceStream | None = None
        self._pieces: deque[_Piece] = deque()
        self._in_flight: _Piece | None = None
        self._sent_to = 0  # audio before this went to an engine stream: the next utterance starts after it
        self._last_partial = ""
        self._last_partial_at = 0
        self._resets = 0

    @property
    def backlog_samples(self) -> int:
        return sum(len(piece.samples) for piece in self._pieces)

    @property
    def owes_finals(self) -> bool:
        return bool(self._pieces)

    def take(self, events: list[UtteranceEvent]) -> None:
        for event in events:
            if isinstance(event, Opened):
                start = max(event.start, self._sent_to)  # audio reaches the engine once
                stream = self._engine.open_stream(self._options.language)
                self._open = _UtteranceStream(event.index, start, stream, start, np.zeros(0, np.float32))
                self._last_partial, self._last_partial_at = "", start
            elif self._open is None:
                continue
            elif isinstance(event, Grew):
                self._hold(self._open, event.start, event.samples)
                self._queue_pieces(self._open, last=False)
            elif isinstance(event, Closed):
                self._close(self._open, event.utterance.end, event.utterance.start, event.utterance.samples)
            elif isinstance(event, Dropped):
                self._drop(self._open)

    def reset(self) -> None:
        self._resets += 1
        self.close()
        self._pieces.clear()
        self._open = None

    def close(self) -> None:
        utterances = {id(p.utterance): p.utterance for p in [*self._pieces, self._in_flight] if p is not None}
        if self._open is not None:
            utterances[id(self._open)] = self._open
        for utterance in utterances.values():
            utterance.stream.close()

    async def step(self) -> list[SessionEvent] | None:
        if not self._pieces:
            return None
        piece = self._in_flight = self._pieces.popleft()
        utterance, resets = piece.utterance, self._resets
        if piece.last:
            utterance.stream.finish()
        try:
            update = await self._scheduler.submit((utterance.stream, piece.samples))
        finally:
            self._in_flight = None
        if update.final_text:
            utterance.final_parts.append(update.final_text)
        utterance.partial = update.partial_text
        if utterance.dropped or resets != self._resets:
            return []
        text, start = utterance.text, utterance.start / self._rate
        if piece.last:
            assert utterance.end is not None
            if not text:
                return []
            end = utterance.end / self._rate
            return [FinalText(utterance.index, text, start, end, self._options.language)]
        if (
            not self._options.enable_partial
            or not text
            or text == self._last_partial
            or piece.end - self._last_partial_at < self._partial_step
            or self._open is not utterance
        ):
            return []
        self._last_partial, self._last_partial_at = text, piece.end
        stable = sum(len(part.split()) for part in utterance.final_parts)  # the engine's own finals
        return [PartialText(utterance.index, text, start, piece.end / self._rate, stable)]

    def _hold(self, utterance: _UtteranceStream, start: int, samples: np.ndarray) -> None:
        """Add audio beginning at absolute ``start`` to what waits for the utterance's next piece."""
        new = samples[max(0, utterance.received_to - start) :]
        utterance.held = np.concatenate([utterance.held, new]) if len(utterance.held) else new

    def _queue_pieces(self, utterance: _UtteranceStream, last: bool) -> None:
        """Queue the held audio's whole pieces; with ``last``, the rest too (maybe nothing), as the stream's
        last piece."""
        held = utterance.held
        count = (-(-len(held) // self._chunk) or 1) if last else len(held) // self._chunk
        for i in range(count):
            samples = held[i * self._chunk : (i + 1) * self._chunk]
            utterance.queued_to += len(samples)
            self._pieces.append(_Piece(utterance, samples, utterance.queued_to, last and i == count - 1))
        utterance.held = held[count * self._chunk :]
        self._sent_to = max(self._sent_to, utterance.queued_to)

    def _close(self, utterance: _UtteranceStream, end: int, start: int, samples: np.ndarray) -> None:
        """The utterance ends at ``end``: its audio up to there goes to the engine, then the stream ends.
        (The engine may already have audio past ``end``: then the utterance ends where that audio ends.)"""
        self._open = None
        self._hold(utterance, start, samples)
        utterance.held = utterance.held[: max(0, end - utterance.queued_to)]
        utterance.end = max(end, utterance.queued_to)
        if utterance.queued_to == utterance.start and not len(utterance.held):
            utterance.stream.close()  # none of its audio is new to the engine
            return
        self._queue_pieces(utterance, last=True)

    def _drop(self, utterance: _UtteranceStream) -> None:
        self._open = None
        utterance.dropped = True
        self._pieces = deque(piece for piece in self._pieces if piece.utterance is not utterance)
        utterance.stream.close()
