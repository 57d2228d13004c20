"""Where utterances start, end and are cut: the one set of rules for live streams and whole files.

VAD events become utterances: speech padded by ``speech_pad_ms`` on each side, bursts shorter than
``min_speech_ms`` dropped, and an utterance that reaches ``max_seconds`` cut at its quietest moment in
its second half (the rest goes on as the next utterance), so that no window outgrows what an engine
decodes well. Memory is bounded by ``max_seconds``: silence is not kept beyond the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamscribe.audio import AudioBuffer
from streamscribe.streaming.vad import CHUNK, SileroVad, SpeechEnd, SpeechStart, VadOptions, VadStream

# A long utterance may be cut only where the stream reaches a multiple of this, so where it is cut does
# not depend on how the audio arrived.
_CUT_STEP = 16 * CHUNK  # 0.512 s at 16 kHz


@dataclass(frozen=True)
class Utterance:
    """A closed utterance.

    Attributes:
        start: Absolute index of its first sample in the stream.
        end: Absolute index just after its last sample.
        samples: Its audio, ``end - start`` samples.
    """

    start: int
    end: int
    samples: np.ndarray


class Segmenter:
    """Feeds one stream's audio to the VAD and hands back the utterances it closes, in order."""

    def __init__(self, vad: SileroVad, options: VadOptions, max_seconds: float, rate: int) -> None:
        self._vad = VadStream(vad, options)
        self.rate = rate
        self._pad = options.speech_pad_ms * rate // 1000
        self._min_speech = options.min_speech_ms * rate // 1000
        self._max_length = int(max_seconds * rate)
        self.buffer = AudioBuffer()
        self.open_start: int | None = None  # where the open utterance starts, None between utterances
        self._speech_start = 0  # where the VAD heard its speech begin (after the padding)
        self.ended = 0  # utterances closed or dropped so far: a change tells a caller its open one is gone

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

    def feed(self, samples: np.ndarray) -> list[Utterance]:
        """Add audio; return the utterances it closed. The same audio gives the same utterances however
        it is split: a live stream's 0.1 s frames and a file's 10 s pieces are cut alike."""
        closed: list[Utterance] = []
        while len(samples):
            room = _CUT_STEP - self.buffer.end % _CUT_STEP
            closed += self._feed_piece(samples[:room], at_step=len(samples) >= room)
            samples = samples[room:]
        return closed

    def _feed_piece(self, samples: np.ndarray, at_step: bool) -> list[Utterance]:
        closed: list[Utterance] = []
        self.buffer.append(samples)
        for event in self._vad.process(samples):
            if isinstance(event, SpeechStart) and self.open_start is None:
                self.open_start = max(self.buffer.start, event.sample - self._pad)
                self._speech_start = event.sample
            elif isinstance(event, SpeechEnd) and self.open_start is not None:
                if event.duration < self._min_speech:
                    self._drop(event.sample)
                else:
                    closed.append(self._close(min(event.sample + self._pad, self.buffer.end)))
        if self.open_start is None:
            # Keep the padding before audio the VAD has yet to judge (up to a step of it waits for more).
            self.buffer.trim_before(self.buffer.end - self._pad - CHUNK)
        elif at_step and self.buffer.end + _CUT_STEP - self.open_start > self._max_length:
            closed.append(self._cut())  # by the next step it would be too long
        return closed

    def flush(self) -> list[Utterance]:
        """Close the open utterance where the audio ends (dropped when shorter than ``min_speech_ms``)."""
        if self.open_start is None:
            return []
        if self.buffer.end - self._speech_start < self._min_speech:
            self._drop(self.buffer.end)
            return []
        return [self._close(self.buffer.end)]

    def reset(self) -> None:
        """Forget the audio and the open utterance; the stream's clock keeps running."""
        position = self.buffer.end
        self.buffer.clear(position)
        self._vad.reset(position)
        if self.open_start is not None:
            self.ended += 1
        self.open_start = None

    def _close(self, end: int) -> Utterance:
        assert self.open_start is not None
        utterance = Utterance(self.open_start, end, self.buffer.slice(self.open_start, end))
        self.buffer.trim_before(end)
        self._vad.forget_before(end)
        self.open_start = None
        self.ended += 1
        return utterance

    def _drop(self, end: int) -> None:
        self.buffer.trim_before(end)
        self.open_start = None
        self.ended += 1

    def _cut(self) -> Utterance:
        """Close a long utterance at its quietest moment in its second half; the rest stays open."""
        assert self.open_start is not None
        lo = self.open_start + self._max_length // 2
        hi = self.buffer.end - self.rate // 2
        cut = self._vad.quietest_sample(lo, hi) or self.buffer.end
        utterance = self._close(cut)
        self.open_start = self._speech_start = cut
        return utterance
