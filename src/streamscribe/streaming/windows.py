"""Utterances as windows, for engines that decode whole windows (Whisper, Canary, Parakeet offline).

Each closed utterance is decoded once, as its final. The open one is decoded again every
``partial_interval`` of new audio, as a growing window, and LocalAgreement keeps what two decodes in a
row agree on: those stable words are forced as the next decode's prefix, so they never flicker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

from streamscribe.engines.base import AudioWindow, Transcript, Word
from streamscribe.streaming.policy import LocalAgreement
from streamscribe.streaming.scheduler import Priority, Scheduler, StaleWork
from streamscribe.streaming.segmenter import Closed, Grew, Opened, Segmenter, Utterance, UtteranceEvent
from streamscribe.streaming.session import (
    FinalText,
    LiveSession,
    PartialText,
    SessionEvent,
    SessionOptions,
)
from streamscribe.streaming.vad import SileroVad

_PAUSE_SECONDS = 0.1  # no speech heard this long: a pause (continuous speech: 64-300 ms between sentences)


def window_session(
    scheduler: Scheduler[AudioWindow, Transcript],
    vad: SileroVad,
    options: SessionOptions,
    emit: Callable[[SessionEvent], Awaitable[None]],
    rate: int,
) -> LiveSession:
    """A live session whose utterances are decoded as windows through ``scheduler``."""
    segmenter = Segmenter(vad, options.vad, options.max_segment_seconds, rate)
    return LiveSession(segmenter, WindowDecoder(scheduler, segmenter, options), options, emit)


class WindowDecoder:
    """A session's ``UtteranceDecoder`` that re-decodes windows through the engine's scheduler."""

    def __init__(
        self, scheduler: Scheduler[AudioWindow, Transcript], segmenter: Segmenter, options: SessionOptions
    ) -> None:
        rate = segmenter.rate
        self._scheduler = scheduler
        self._segmenter = segmenter
        self._options = options
        self._rate = rate
        self._partial_step = int(options.partial_interval * rate)
        self._first_partial = rate + options.vad.speech_pad_ms * rate // 1000
        self._pause = int(_PAUSE_SECONDS * rate)
        self._closed: deque[Utterance] = deque()
        self._context = ""  # the stream's latest final text, up to ``prompt_chars``: each window's prompt
        self._agreement = LocalAgreement()
        self._open_index = 0
        self._partial_decoded_to = 0
        self._last_partial = ""
        self._resets = 0  # a decode that returns after a reset is discarded
        self._utterances = 0  # changes whenever the open utterance ends: its partials are stale

    @property
    def backlog_samples(self) -> int:
        waiting = sum(len(utterance.samples) for utterance in self._closed)
        if self._segmenter.open_start is not None:
            waiting += self._segmenter.end - self._segmenter.open_start
        return waiting

    @property
    def owes_finals(self) -> bool:
        return bool(self._closed)

    def take(self, events: list[UtteranceEvent]) -> None:
        for event in events:
            if isinstance(event, Grew):
                continue
            if isinstance(event, Closed):
                self._closed.append(event.utterance)
            elif isinstance(event, Opened):
                self._open_index = event.index
            self._new_utterance()

    def reset(self) -> None:
        self._resets += 1
        self._closed.clear()
        self._context = ""
        self._new_utterance()

    def close(self) -> None:
        pass  # the engine keeps no state between windows

    async def step(self) -> list[SessionEvent] | None:
        if self._closed:
            return await self._decode_final()
        if self.wants_partial():
            return await self._decode_partial()
        return None

    def _new_utterance(self) -> None:
        self._utterances += 1
        self._agreement.reset()
        self._partial_decoded_to = 0
        self._last_partial = ""

    def wants_partial(self) -> bool:
        """Whether the open utterance is due a partial now."""
        start = self._segmenter.open_start
        if not self._options.enable_partial or start is None:
            return False
        if self._segmenter.end - start < self._first_partial:
            return False  # hypotheses of under a second of speech mostly get rewritten: wait
        if self._segmenter.last_voiced <= self._partial_decoded_to:
            return False  # only silence since the last partial: its text cannot have changed
        pressure = self._scheduler.pressure
        if pressure == 1 and self._segmenter.end - self._segmenter.last_voiced >= self._pause:
            # The speaker paused: their last words go on screen now, not after the final's wait for
            # min_silence_ms (most sentences end so), and nothing is decoded again until speech resumes.
            return True
        # Under load partials come less often (never finals): the engine's time goes to finals first.
        step = self._partial_step * pressure
        return self._segmenter.end - self._partial_decoded_to >= step

    def _window(self, samples: np.ndarray, final: bool, prefix: str | None = None) -> AudioWindow:
        # The client's prompt (vocabulary, spelling, style) comes first, then the stream's own recent text:
        # for finals only. A partial's decoder would read those ~50 tokens again at every re-decode (15% of
        # its cost) for tentative text that came out no better with them (long.wav's partials, measured).
        context = self._context if final else ""
        prompt = " ".join(part for part in (self._options.prompt, context) if part)
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

    async def _decode_final(self) -> list[SessionEvent]:
        resets, utterance = self._resets, self._closed[0]
        transcript = await self._scheduler.submit(self._window(utterance.samples, final=True), Priority.FINAL)
        if resets != self._resets:
            return []
        self._closed.popleft()
        if not transcript.text:
            return []
        if self._options.prompt_chars:
            self._context = " ".join(part for part in (self._context, transcript.text) if part)
            self._context = self._context[-self._options.prompt_chars :]
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
        return [FinalText(utterance.index, transcript.text, offset, end, transcript.language, words)]

    async def _decode_partial(self) -> list[SessionEvent]:
        segmenter = self._segmenter
        assert segmenter.open_start is not None
        utterances, start, end = self._utterances, segmenter.open_start, segmenter.end
        self._partial_decoded_to = end
        # Stable words are forced as the decode's prefix: they cannot flicker, and are not decoded again.
        prefix = " ".join(self._agreement.stable) or None
        window = self._window(segmenter.open_samples(), False, prefix)

        def stale() -> bool:  # the utterance ended, or the stream was reset
            return utterances != self._utterances

        try:
            transcript = await self._scheduler.submit(window, Priority.PARTIAL, stale)
        except StaleWork:
            return []  # dropped unstarted: the stream's final goes next instead of waiting behind it
        if stale():
            return []
        text = self._agreement.update(transcript.text)
        if not text or text == self._last_partial:
            return []
        self._last_partial = text
        stable = len(self._agreement.stable)
        return [PartialText(self._open_index, text, start / self._rate, end / self._rate, stable)]
