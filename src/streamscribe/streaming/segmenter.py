"""Where utterances start, end and are cut: the one set of rules for live streams and whole files.

VAD events become utterances: speech padded by ``speech_pad_ms`` on each side, bursts shorter than
``min_speech_ms`` dropped. An utterance longer than ``pause_cut_ms`` is closed at its longest short pause
(the rest goes on as the next utterance): continuous speech then gets a final every sentence or two
instead of one every ``max_seconds``, and its partials stay short. One that reaches ``max_seconds``
without such a pause is cut at its quietest moment in its second half, so that no window outgrows what an
engine decodes well. Memory is bounded by ``max_seconds``: silence is not kept beyond the padding.

What it reports, in order: an utterance ``Opened``, ``Grew`` by new audio, and was ``Closed`` (a final
is owed for it) or ``Dropped`` (too short to be speech, or reset). Whole files use only the closed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamscribe.audio import AudioBuffer
from streamscribe.streaming.vad import CHUNK, SileroVad, SpeechEnd, SpeechStart, VadOptions, VadStream

# A long utterance may be cut only where the stream reaches a multiple of this, so where it is cut does
# not depend on how the audio arrived.
_CUT_STEP = 16 * CHUNK  # 0.512 s at 16 kHz
_PAUSE_CHUNKS = 3  # a pause to cut at: 96 ms not voiced (between words of one phrase there is less)


@dataclass(frozen=True)
class Utterance:
    """A closed utterance.

    Attributes:
        index: Utterances closed before it since the stream started (or was reset): its segment id.
        start: Absolute index of its first sample in the stream.
        end: Absolute index just after its last sample.
        samples: Its audio, ``end - start`` samples.
    """

    index: int
    start: int
    end: int
    samples: np.ndarray


@dataclass(frozen=True)
class Opened:
    """An utterance began at absolute sample ``start``; it will be ``index`` if it closes."""

    index: int
    start: int


@dataclass(frozen=True)
class Grew:
    """The open utterance's next audio, beginning at absolute sample ``start``."""

    start: int
    samples: np.ndarray


@dataclass(frozen=True)
class Closed:
    utterance: Utterance


@dataclass(frozen=True)
class Dropped:
    """The open utterance was not speech after all (or the stream was reset): no final for it."""


UtteranceEvent = Opened | Grew | Closed | Dropped


class Segmenter:
    """Feeds one stream's audio to the VAD and hands back the utterances it closes, in order."""

    def __init__(self, vad: SileroVad, options: VadOptions, max_seconds: float, rate: int) -> None:
        self._vad = VadStream(vad, options)
        self.rate = rate
        self._pad = options.speech_pad_ms * rate // 1000
        self._min_speech = options.min_speech_ms * rate // 1000
        self._max_length = int(max_seconds * rate)
        self._pause_cut = options.pause_cut_ms * rate // 1000
        self.buffer = AudioBuffer()
        self.open_start: int | None = None  # where the open utterance starts, None between utterances
        self._speech_start = 0  # where the VAD heard its speech begin (after the padding)
        self._reported_to = 0  # the open utterance's audio before this has been reported (Grew)
        self._closed = 0  # utterances closed since the start or the last reset

    @property
    def end(self) -> int:
        """Absolute index just after the last sample fed."""
        return self.buffer.end

    @property
    def last_voiced(self) -> int:
        """End of the latest audio that sounded like speech."""
        return self._vad.last_voiced

    def open_samples(self) -> np.ndarray:
        """A copy of the open utterance's audio so far (empty between utterances)."""
        if self.open_start is None:
            return np.zeros(0, dtype=np.float32)
        return self.buffer.slice(self.open_start, self.buffer.end)

    def feed(self, samples: np.ndarray) -> list[UtteranceEvent]:
        """Add audio; return what it did to utterances. The same audio gives the same utterances however
        it is split: a live stream's 0.1 s frames and a file's 10 s pieces are cut alike."""
        events: list[UtteranceEvent] = []
        while len(samples):
            room = _CUT_STEP - self.buffer.end % _CUT_STEP
            events += self._feed_piece(samples[:room], at_step=len(samples) >= room)
            samples = samples[room:]
        return events

    def _feed_piece(self, samples: np.ndarray, at_step: bool) -> list[UtteranceEvent]:
        events: list[UtteranceEvent] = []
        self.buffer.append(samples)
        for event in self._vad.process(samples):
            if isinstance(event, SpeechStart) and self.open_start is None:
                events.append(self._open(max(self.buffer.start, event.sample - self._pad), event.sample))
            elif isinstance(event, SpeechEnd) and self.open_start is not None:
                if event.duration < self._min_speech:
                    events.append(self._drop(event.sample))
                else:
                    events.append(self._close(min(event.sample + self._pad, self.buffer.end)))
        if self.open_start is None:
            # Keep the padding before audio the VAD has yet to judge (up to a step of it waits for more).
            self.buffer.trim_before(self.buffer.end - self._pad - CHUNK)
            return events
        if at_step and self._pause_cut and self.buffer.end - self.open_start > self._pause_cut:
            events += self._cut_at_pause()
        if at_step and self.buffer.end + _CUT_STEP - self.open_start > self._max_length:
            events += self._cut()  # by the next step it would be too long
        if self.buffer.end > self._reported_to:
            events.append(Grew(self._reported_to, self.buffer.slice(self._reported_to, self.buffer.end)))
            self._reported_to = self.buffer.end
        return events

    def flush(self) -> list[UtteranceEvent]:
        """Close the open utterance where the audio ends (dropped when shorter than ``min_speech_ms``)."""
        if self.open_start is None:
            return []
        if self.buffer.end - self._speech_start < self._min_speech:
            return [self._drop(self.buffer.end)]
        return [self._close(self.buffer.end)]

    def reset(self) -> None:
        """Forget the audio, the open utterance and the count of closed ones; the stream's clock keeps
        running."""
        position = self.buffer.end
        self.buffer.clear(position)
        self._vad.reset(position)
        self.open_start = None
        self._closed = 0

    def _open(self, start: int, speech_start: int) -> Opened:
        self.open_start, self._speech_start, self._reported_to = start, speech_start, start
        return Opened(self._closed, start)

    def _close(self, end: int) -> Closed:
        assert self.open_start is not None
        utterance = Utterance(self._closed, self.open_start, end, self.buffer.slice(self.open_start, end))
        self.buffer.trim_before(end)
        self._vad.forget_before(end)
        self.open_start = None
        self._closed += 1
        return Closed(utterance)

    def _drop(self, end: int) -> Dropped:
        self.buffer.trim_before(end)
        self.open_start = None
        return Dropped()

    def _cut_at_pause(self) -> list[UtteranceEvent]:
        """Close a long utterance in its longest pause after the first half of ``pause_cut_ms``, if any."""
        assert self.open_start is not None
        cut = self._vad.longest_pause(self.open_start + self._pause_cut // 2, self.buffer.end, _PAUSE_CHUNKS)
        return [] if cut is None else [self._close(cut), self._open(cut, cut)]

    def _cut(self) -> list[UtteranceEvent]:
        """Close a long utterance at its quietest moment in its second half; the rest is the next one."""
        assert self.open_start is not None
        lo = self.open_start + self._max_length // 2
        hi = self.buffer.end - self.rate // 2
        cut = self._vad.quietest_sample(lo, hi) or self.buffer.end
        return [self._close(cut), self._open(cut, cut)]
