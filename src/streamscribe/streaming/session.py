"""One live stream: VAD cuts audio into utterances; closed ones become finals, the open one partials.

Audio flows in through ``feed`` (already at the engine's rate). A decoder task per session sends work to
the shared scheduler: every closed utterance once, as a final (in order, never revised), and the open
utterance every ``partial_interval`` of new audio, stabilised by LocalAgreement. Finals never overlap, so
no word is repeated at a border. Memory is bounded: silence is dropped, an utterance is cut at its
quietest moment once it reaches ``max_segment_seconds`` (``segmenter.py`` decides where utterances start,
end and are cut, for files too), and audio waiting for decoding is capped by backpressure on ``feed``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from streamscribe.engines.base import AudioWindow, Word
from streamscribe.streaming.policy import LocalAgreement
from streamscribe.streaming.scheduler import DecodeScheduler, Priority, StaleWork
from streamscribe.streaming.segmenter import Segmenter, Utterance
from streamscribe.streaming.vad import SileroVad, VadOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionOptions:
    """How one stream is transcribed (from the client's config and the server's settings)."""

    language: str = "en"
    enable_partial: bool = True
    partial_interval: float = 0.5
    max_segment_seconds: float = 15.0
    max_backlog_seconds: float = 60.0
    prompt_chars: int = 200
    word_timestamps: bool = False
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt: str | None = None
    hotwords: str | None = None
    vad: VadOptions = field(default_factory=VadOptions)


@dataclass(frozen=True)
class PartialText:
    """The open utterance's text so far (replaces the previous partial)."""

    segment_id: int
    text: str
    start: float
    end: float


@dataclass(frozen=True)
class FinalSegment:
    """A finished utterance; never revised."""

    segment_id: int
    text: str
    start: float
    end: float
    language: str
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class EngineFailure:
    message: str


SessionEvent = PartialText | FinalSegment | EngineFailure


class LiveSession(Protocol):
    """What a connection drives: ``StreamingSession`` here, or ``native.NativeStreamingSession``."""

    @property
    def full_transcript(self) -> str: ...

    @property
    def received_seconds(self) -> float: ...

    @property
    def in_utterance(self) -> bool: ...

    async def feed(self, samples: np.ndarray) -> None: ...

    async def flush(self) -> str: ...

    def reset(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class _ClosedUtterance:
    """An utterance waiting for its final, and the segment id the final will carry."""

    segment_id: int
    utterance: Utterance


class SessionCore(abc.ABC):
    """What both kinds of live session share: one stream's finals, backpressure, and a decode task woken
    by new audio. Subclasses decide how utterances reach the engine."""

    def __init__(
        self,
        rate: int,
        options: SessionOptions,
        emit: Callable[[SessionEvent], Awaitable[None]],
    ) -> None:
        self._options = options
        self._emit = emit
        self._rate = rate
        self._partial_step = int(options.partial_interval * rate)
        self._finals: list[str] = []
        self._generation = 0
        self._next_segment_id = 0
        self._last_partial = ""
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._drained = asyncio.Event()
        # Starts running at the next await, after the subclass's __init__ has finished.
        self._worker = asyncio.create_task(self._decode_loop())

    @property
    def full_transcript(self) -> str:
        return " ".join(self._finals)

    @abc.abstractmethod
    def backlog_seconds(self) -> float:
        """Seconds of audio received but not yet decoded."""

    @abc.abstractmethod
    def _has_queued_work(self) -> bool:
        """True while finished audio waits for the engine (so waiting for room will end)."""

    @abc.abstractmethod
    async def _decode_forever(self) -> None:
        """The decode task's loop: wait for ``_wake``, send work to the engine, emit events."""

    async def close(self) -> None:
        """Stop the decode task; work it had not finished is dropped."""
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)

    async def _wait_for_room(self) -> None:
        """Backpressure: hold the caller while too much audio waits for the engine."""
        while self.backlog_seconds() > self._options.max_backlog_seconds and self._has_queued_work():
            self._drained.clear()
            await self._drained.wait()

    async def _decode_loop(self) -> None:
        try:
            await self._decode_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("engine failure in stream")
            self._idle.set()
            await self._emit(EngineFailure(f"{type(exc).__name__}: {exc}"))


class StreamingSession(SessionCore):
    """Turns a live stream of 16 kHz samples into partial and final text events."""

    def __init__(
        self,
        scheduler: DecodeScheduler,
        vad: SileroVad,
        options: SessionOptions,
        emit: Callable[[SessionEvent], Awaitable[None]],
    ) -> None:
        rate = scheduler.engine.sample_rate
        super().__init__(rate, options, emit)
        self._scheduler = scheduler
        self._segmenter = Segmenter(vad, options.vad, options.max_segment_seconds, rate)
        self._first_partial = rate + options.vad.speech_pad_ms * rate // 1000
        self._closed: deque[_ClosedUtterance] = deque()
        self._agreement = LocalAgreement()
        self._partial_decoded_to = 0

    @property
    def received_seconds(self) -> float:
        return self._segmenter.end / self._rate

    @property
    def in_utterance(self) -> bool:
        """True while speech has started and not yet ended (an utterance is open)."""
        return self._segmenter.open_start is not None

    def backlog_seconds(self) -> float:
        waiting = sum(len(closed.utterance.samples) for closed in self._closed)
        if self._segmenter.open_start is not None:
            waiting += self._segmenter.end - self._segmenter.open_start
        return waiting / self._rate

    def _has_queued_work(self) -> bool:
        return bool(self._closed)

    async def feed(self, samples: np.ndarray) -> None:
        """Add audio; waits (backpressure) while too much audio is waiting for the engine."""
        await self._wait_for_room()
        ended = self._segmenter.ended
        self._queue(self._segmenter.feed(samples))
        if self._segmenter.ended != ended:
            self._start_new_utterance()
        self._wake.set()

    async def flush(self) -> str:
        """Finish everything received so far: emit its finals, then return the full transcript."""
        self._queue(self._segmenter.flush())
        self._start_new_utterance()
        if self._closed:
            self._idle.clear()
            self._wake.set()
        await self._idle.wait()
        return self.full_transcript

    def reset(self) -> None:
        """Drop buffered audio, pending work and the transcript; the stream's clock keeps running."""
        self._generation += 1
        self._segmenter.reset()
        self._closed.clear()
        self._start_new_utterance()
        self._finals.clear()
        self._next_segment_id = 0
        self._idle.set()
        self._drained.set()

    def _queue(self, utterances: list[Utterance]) -> None:
        for utterance in utterances:
            self._closed.append(_ClosedUtterance(self._next_segment_id, utterance))
            self._next_segment_id += 1
            self._idle.clear()

    def _start_new_utterance(self) -> None:
        self._agreement.reset()
        self._partial_decoded_to = 0
        self._last_partial = ""

    def _wants_partial(self) -> bool:
        start = self._segmenter.open_start
        if not self._options.enable_partial or start is None or self._closed:
            return False
        if self._segmenter.end - start < self._first_partial:
            return False  # hypotheses of under a second of speech mostly get rewritten: wait
        if self._segmenter.last_voiced <= self._partial_decoded_to:
            return False  # only silence since the last partial: its text cannot have changed
        # Under load partials come less often (never finals): the engine's time goes to finals first.
        step = self._partial_step * self._scheduler.pressure
        return self._segmenter.end - self._partial_decoded_to >= step

    def _window(self, samples: np.ndarray, final: bool, prefix: str | None = None) -> AudioWindow:
        previous = self.full_transcript[-self._options.prompt_chars :] if self._options.prompt_chars else ""
        # The client's prompt (vocabulary, spelling, style) comes first, then the stream's own recent text.
        prompt = " ".join(part for part in (self._options.prompt, previous) if part)
        return AudioWindow(
            samples=samples,
            language=self._options.language,
            final=final,
            prompt=prompt or None,
            prefix=prefix,
            word_timestamps=final and self._options.word_timestamps,
            task=self._options.task,
            hotwords=self._options.hotwords,
        )

    async def _decode_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._decode_finals()
            if self._wants_partial():
                await self._decode_partial()
                self._wake.set()

    async def _decode_finals(self) -> None:
        while self._closed:
            generation = self._generation
            segment_id, utterance = self._closed[0].segment_id, self._closed[0].utterance
            transcript = await self._scheduler.decode(
                self._window(utterance.samples, final=True), Priority.FINAL
            )
            if generation != self._generation:
                return
            self._closed.popleft()
            self._drained.set()
            if transcript.text:
                self._finals.append(transcript.text)
                offset, end = utterance.start / self._rate, utterance.end / self._rate
                # Clamped to the utterance: Whisper may place a last word's end a few ms past the window.
                words = tuple(
                    Word(
                        w.text,
                        min(max(w.start + offset, offset), end),
                        min(max(w.end + offset, offset), end),
                        w.probability,
                    )
                    for w in transcript.words
                )
                await self._emit(
                    FinalSegment(
                        segment_id,
                        transcript.text,
                        offset,
                        end,
                        transcript.language,
                        words,
                    )
                )
        self._idle.set()

    async def _decode_partial(self) -> None:
        segmenter = self._segmenter
        assert segmenter.open_start is not None
        generation, ended, start, end = self._generation, segmenter.ended, segmenter.open_start, segmenter.end
        self._partial_decoded_to = end
        samples = segmenter.open_samples()
        # Stable words are forced as the decode's prefix: they cannot flicker, and are not decoded again.
        prefix = " ".join(self._agreement.stable) or None

        def stale() -> bool:  # the utterance closed or the stream was reset
            return generation != self._generation or segmenter.ended != ended

        try:
            transcript = await self._scheduler.decode(
                self._window(samples, False, prefix), Priority.PARTIAL, stale
            )
        except StaleWork:
            return  # dropped unstarted: the stream's final goes next instead of waiting behind it
        if stale():
            return
        text = self._agreement.update(transcript.text)
        if text and text != self._last_partial:
            self._last_partial = text
            await self._emit(PartialText(self._next_segment_id, text, start / self._rate, end / self._rate))
