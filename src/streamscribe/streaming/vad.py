"""Silero VAD through onnxruntime (no torch): where speech starts and ends in a live stream.

The VAD hears conditioned audio (``VadInputConditioner``: DC offset removed, quiet audio raised); the
engine always gets the original samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamscribe.config import VadOptions
from streamscribe.engines import SAMPLE_RATE
from streamscribe.engines.base import EngineUnavailable

CHUNK = 512  # samples per model step at 16 kHz (32 ms)
_CONTEXT = 64  # samples of the previous chunk the model sees with each step
_TARGET_RMS = 0.05  # about -26 dBFS: a speaking level, far from clipping
_LEVEL_HALF_LIFE_S = 4.0  # how fast the remembered level falls in a pause or silence
_DC_WEIGHT = 0.064  # each chunk's mean in the running DC estimate: a time constant of about 0.5 s
# The shipped silero_vad.onnx: byte for byte silero_vad/data/silero_vad.onnx of the silero-vad 6.2.3 wheel.
SILERO_SHA256 = "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"


def silero_model_path() -> Path:
    """Silero VAD 6.2.3's ONNX model, shipped inside this package (MIT, see ``silero_vad.LICENSE``).

    Shipped rather than depended on: the silero-vad wheel declares torch (a multi-GB install) for code we
    never run. faster-whisper's bundled ``silero_vad_v6.onnx`` is a different model that finds speech far
    less accurately on our clips, so it is no substitute.
    """
    path = Path(__file__).with_name("silero_vad.onnx")
    if not path.is_file():
        raise EngineUnavailable(f"the package's {path.name} is missing: reinstall streamscribe")
    return path


class SileroVad:
    """The shared ONNX model. Each stream keeps its own state in a ``VadStream``."""

    def __init__(self, path: Path | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(path or silero_model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def step(self, chunks: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Speech probabilities for [batch, CONTEXT + CHUNK] samples; returns (probs[batch], new state)."""
        probs, new_state = self._session.run(None, {"input": chunks, "state": state, "sr": self._sr})
        return probs[:, 0], new_state


class VadInputConditioner:
    """What the VAD hears of one stream: the DC offset removed and quiet audio raised to a speaking level.

    Silero depends on level where Whisper (whose log-mel input is normalised) does not: at -40 dBFS peak
    it holds speech 100 ms or more into each pause, so sentences merge into one utterance, and at -60 dBFS
    it misses whole sentences that Whisper transcribes word for word. The gain follows the loudest recent
    chunk (at once when it gets louder, with a 4 s half-life when it gets quieter), never attenuates, and
    stops at ``max_gain_db`` so a quiet room is not raised to the level of speech. The level is measured
    without DC, which is a running mean of chunk means, ramped across each chunk so it adds no steps.
    """

    def __init__(self, max_gain_db: float) -> None:
        self._max_gain = 10 ** (max_gain_db / 20)
        self._decay = 0.5 ** (CHUNK / SAMPLE_RATE / _LEVEL_HALF_LIFE_S)
        self._dc: float | None = None
        self._level = 0.0

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        """One CHUNK of samples as the VAD should hear it (a new array)."""
        mean = float(chunk.mean())
        previous = mean if self._dc is None else self._dc
        self._dc = previous + _DC_WEIGHT * (mean - previous)
        centred = chunk - np.linspace(previous, self._dc, len(chunk), endpoint=False, dtype=np.float32)
        self._level = max(self._level * self._decay, float(np.sqrt(np.mean(centred * centred))))
        gain = min(self._max_gain, max(1.0, _TARGET_RMS / self._level)) if self._level > 0 else 1.0
        return centred * np.float32(gain)


@dataclass(frozen=True)
class SpeechStart:
    sample: int


@dataclass(frozen=True)
class SpeechEnd:
    """Speech ended at ``sample``; ``duration`` is the length of the speech run in samples."""

    sample: int
    duration: int


VadEvent = SpeechStart | SpeechEnd


class VadStream:
    """Per-stream VAD state: feeds 32 ms steps to the model and turns probabilities into speech events.

    Hysteresis as in Silero's own iterator: enter speech at ``threshold``, leave after ``min_silence_ms``
    below ``threshold - 0.15``. Sample indexes are absolute within the stream.
    """

    def __init__(self, model: SileroVad, options: VadOptions) -> None:
        self._model = model
        self._options = options
        self._min_silence = options.min_silence_ms * SAMPLE_RATE // 1000
        self.reset(0)

    def reset(self, position: int) -> None:
        """Forget all state; the next sample fed has absolute index ``position``."""
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._conditioner = VadInputConditioner(self._options.max_gain_db)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._position = position  # absolute index of the first sample in _pending
        self.in_speech = False
        self._speech_start = 0
        self._silence_start: int | None = None
        self.last_voiced = position  # end of the latest chunk that sounded like speech
        self.probabilities: list[tuple[int, float]] = []  # (chunk start, prob) while in speech

    def process(self, samples: np.ndarray) -> list[VadEvent]:
        """Consume samples (16 kHz float32, left unchanged); return the speech boundaries they revealed."""
        self._pending = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        events: list[VadEvent] = []
        steps = len(self._pending) // CHUNK
        for i in range(steps):
            chunk = self._conditioner(self._pending[i * CHUNK : (i + 1) * CHUNK])
            window = np.concatenate([self._context, chunk])[None, :]
            probs, self._state = self._model.step(window, self._state)
            self._context = chunk[-_CONTEXT:]
            event = self._advance(self._position + i * CHUNK, float(probs[0]))
            if event is not None:
                events.append(event)
        self._pending = self._pending[steps * CHUNK :]
        self._position += steps * CHUNK
        return events

    def _advance(self, at: int, prob: float) -> VadEvent | None:
        threshold = self._options.threshold
        if self.in_speech:
            self.probabilities.append((at, prob))
        if prob >= threshold - 0.15:
            self.last_voiced = at + CHUNK
        if prob >= threshold:
            self._silence_start = None
            if not self.in_speech:
                self.in_speech = True
                self._speech_start = at
                self.probabilities = [(at, prob)]
                return SpeechStart(at)
            return None
        if self.in_speech and prob < threshold - 0.15:
            if self._silence_start is None:
                self._silence_start = at
            elif at + CHUNK - self._silence_start >= self._min_silence:
                self.in_speech = False
                end = self._silence_start
                self._silence_start = None
                return SpeechEnd(end, end - self._speech_start)
        return None

    def quietest_sample(self, lo: int, hi: int) -> int | None:
        """The chunk start in [lo, hi) with the lowest speech probability: the least harmful place to cut."""
        candidates = [(prob, at) for at, prob in self.probabilities if lo <= at < hi]
        return min(candidates)[1] if candidates else None

    def longest_pause(self, lo: int, hi: int, min_chunks: int) -> int | None:
        """The middle of the longest pause inside [lo, hi): a run of at least ``min_chunks`` chunks too
        quiet to count as voiced, with speech after it (a pause still going on may yet end the utterance);
        the latest of equal ones. A short dip between words does not end an utterance, but it is where
        continuous speech takes its breath, usually at a sentence's end."""
        quiet = self._options.threshold - 0.15
        best: tuple[int, int] | None = None  # (length, start)
        run_start, run = 0, 0
        for at, prob in self.probabilities:
            if prob < quiet:
                run_start, run = (at, 1) if run == 0 else (run_start, run + 1)
                continue
            if run >= min_chunks and lo <= run_start and run_start + run * CHUNK <= hi:
                best = max(best or (0, 0), (run, run_start))
            run = 0
        return None if best is None else best[1] + best[0] // 2 * CHUNK

    def forget_before(self, sample: int) -> None:
        self.probabilities = [(at, prob) for at, prob in self.probabilities if at >= sample]
