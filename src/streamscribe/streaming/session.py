"""One live stream: the segmenter cuts audio into utterances; closed ones become finals, the open one
partials.

Audio flows in through ``feed`` (already at the engine's rate) to the ``Segmenter`` (``segmenter.py``
decides where utterances start, end and are cut, for files too). What it reports goes to the session's
``UtteranceDecoder``, which is how utterances reach the engine: ``windows.WindowDecoder`` re-decodes
the open utterance's growing window for partials and each closed one for its final;
``native.NativeStreamDecoder`` feeds each utterance once, piece by piece, to an engine that streams
natively. A decode task per session
runs the decoder's work and emits its text. Finals come in order and are never revised, and they never
overlap, so no word is repeated at a border. Memory is bounded: silence is dropped, utterances are cut at
``max_segment_seconds``, and audio waiting for decoding is capped by backpressure on ``feed``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from streamscribe.engines.base import Word
from streamscribe.streaming.segmenter import Segmenter, UtteranceEvent
from streamscribe.streaming.vad import VadOptions

if TYPE_CHECKING:
    from streamscribe.streaming.diarization import StreamSpeakers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionOptions:
    """How one stream is transcribed (from the client's config and the server's settings)."""

    language: str = "en"
    enable_partial: bool = True
    partial_interval: float = 1.0
    max_segment_seconds: float = 15.0
    max_backlog_seconds: float = 60.0
    prompt_chars: int = 200
    # About 17 hours of speech: a stream kept open for days must not grow without bound.
    max_transcript_chars: int = 1_000_000
    word_timestamps: bool = False
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt: str | None = None
    hotwords: str | None = None
    vad: VadOptions = field(default_factory=VadOptions)


@dataclass(frozen=True)
class PartialText:
    """The open utterance's text so far (replaces the previous partial); ``index`` is the utterance's
    (the wire's ``segment_id``), times are seconds of the stream. Its first ``stable_words`` words are
    kept by every later partial of the utterance (the final is decoded afresh and may still differ)."""

    index: int
    text: str
    start: float
    end: float
    stable_words: int = 0


@dataclass(frozen=True)
class FinalText:
    """A closed utterance's text; never revised."""

    index: int
    text: str
    start: float
    end: float
    language: str
    words: tuple[Word, ...] = ()
    speaker: str | None = None  # with diarization: its majority speaker ("S1", ...)
    speakers: tuple[str, ...] = ()  # with diarization: every speaker in it, in order


@dataclass(frozen=True)
class EngineFailure:
    message: str


SessionEvent = PartialText | FinalText | EngineFailure


class UtteranceDecoder(Protocol):
    """How one session's utterances reach the engine (``WindowDecoder`` or ``NativeStreamDecoder``)."""

    @property
    def backlog_samples(self) -> int:
        """Audio received but not decoded yet."""
        ...

    @property
    def owes_finals(self) -> bool:
        """True while closed utterances wait for their finals."""
        ...

    def take(self, events: list[UtteranceEvent]) -> None:
        """Note what the segmenter reported; the engine work it calls for is done by ``step``."""
        ...

    async def step(self) -> list[SessionEvent] | None:
        """Do the next piece of engine work and return its text events; None when there is none now."""
        ...

    def reset(self) -> None:
        """Forget queued work and the stream's text; what is in flight is discarded when it returns."""
        ...

    def close(self) -> None:
        """Release what the engine holds for this session."""
        ...


class LiveSession:
    """Turns one live stream of samples into partial and final text events."""

    def __init__(
        self,
        segmenter: Segmenter,
        decoder: UtteranceDecoder,
        options: SessionOptions,
        emit: Callable[[SessionEvent], Awaitable[None]],
    ) -> None:
        self._segmenter = segmenter
        self._decoder = decoder
        self._rate = segmenter.rate
        self._max_backlog = options.max_backlog_seconds * segmenter.rate
        self._emit = emit
        self._finals: deque[str] = deque()  # the full transcript, its oldest finals dropped past the cap
        self._transcript_chars = 0
        self._max_transcript_chars = options.max_transcript_chars
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._drained = asyncio.Event()
        # Held while the segmenter runs in a thread (``feed``): the decoder reads the segmenter when a step
        # starts, and ``flush`` changes it, so neither may happen meanwhile.
        self._segmenting = asyncio.Lock()
        self._speakers: StreamSpeakers | None = None
        self._worker = asyncio.create_task(self._decode_loop())

    def label_speakers(self, speakers: StreamSpeakers) -> None:
        """Give each final its speaker (diarization), before any audio is fed."""
        self._speakers = speakers

    @property
    def full_transcript(self) -> str:
        return " ".join(self._finals)

    @property
    def received_seconds(self) -> float:
        return self._segmenter.end / self._rate

    @property
    def in_utterance(self) -> bool:
        """True while speech has started and not yet ended (an utterance is open)."""
        return self._segmenter.open_start is not None

    def backlog_seconds(self) -> float:
        """Seconds of audio received but not yet decoded."""
        return self._decoder.backlog_samples / self._rate

    @property
    def settled(self) -> bool:
        """True when every closed utterance's final has been emitted (or the engine failed)."""
        return self._idle.is_set()

    async def feed(self, samples: np.ndarray) -> list[UtteranceEvent]:
        """Add audio; waits (backpressure) while too much audio is waiting for the engine. The VAD runs in
        a thread, off the event loop; one task feeds a session (and resets it), one call at a time.
        Returns what the audio did to utterances (for protocols that report where speech starts and
        stops); no final of an utterance it closed has been emitted yet when it returns."""
        while self._decoder.backlog_samples > self._max_backlog and self._decoder.owes_finals:
            self._drained.clear()
            await self._drained.wait()
        async with self._segmenting:
            events = await asyncio.to_thread(self._segmenter.feed, samples)
        self._take(events)
        return events

    async def finals_done(self) -> None:
        """Wait until the finals of the utterances closed so far have been emitted (see ``settled``)."""
        await self._idle.wait()

    async def flush(self) -> str:
        """Finish everything received so far: emit its finals, then return the full transcript."""
        async with self._segmenting:
            self._take(self._segmenter.flush())
        await self._idle.wait()
        return self.full_transcript

    def reset(self) -> None:
        """Drop buffered audio, pending work and the transcript; the stream's clock keeps running. Called by
        the task that feeds the session, so never while the segmenter runs in a thread."""
        self._segmenter.reset()
        self._decoder.reset()
        if self._speakers is not None:
            self._speakers.reset()
        self._finals.clear()
        self._transcript_chars = 0
        self._idle.set()
        self._drained.set()

    def carry_over(self, finals: list[str]) -> None:
        """Start the full transcript with the finals of the connection this stream resumes."""
        for text in finals:
            self._keep_final(text)

    async def close(self) -> None:
        """Stop the decode task (work it had not finished is dropped) and free the engine's state."""
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        self._decoder.close()
        if self._speakers is not None:
            self._speakers.close()

    def _keep_final(self, text: str) -> None:
        self._transcript_chars += len(text) + (1 if self._finals else 0)  # the length of full_transcript
        self._finals.append(text)
        while self._transcript_chars > self._max_transcript_chars and len(self._finals) > 1:
            self._transcript_chars -= len(self._finals.popleft()) + 1

    async def _next_step(self) -> list[SessionEvent] | None:
        """The decoder's next step, started while the segmenter is not in a thread: a step reads it before
        its first wait, and between the lock's release and that read nothing else runs on the loop."""
        async with self._segmenting:
            pass
        return await self._decoder.step()

    def _take(self, events: list[UtteranceEvent]) -> None:
        if self._speakers is not None:
            self._speakers.take(events)
        self._decoder.take(events)
        if self._decoder.owes_finals:
            self._idle.clear()
        self._wake.set()

    async def _decode_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while (events := await self._next_step()) is not None:
                    self._drained.set()
                    for event in events:
                        if isinstance(event, FinalText):
                            self._keep_final(event.text)
                            if self._speakers is not None:
                                event = await self._speakers.attach(event)
                        await self._emit(event)
                if not self._decoder.owes_finals:
                    self._idle.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("engine failure in stream")
            self._idle.set()
            await self._emit(EngineFailure(f"{type(exc).__name__}: {exc}"))
