"""Silero VAD through onnxruntime on real clips."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from streamscribe.streaming.vad import (
    SILERO_SHA256,
    SileroVad,
    SpeechEnd,
    SpeechStart,
    VadOptions,
    VadStream,
    silero_model_path,
)


def events_of(samples: np.ndarray, chunk: int = 1600) -> list[SpeechStart | SpeechEnd]:
    stream = VadStream(SileroVad(), VadOptions())
    events = []
    for start in range(0, len(samples), chunk):
        events += stream.process(samples[start : start + chunk])
    return events


def test_the_shipped_model_is_silero_vad_6_2_3s() -> None:
    """The speech timings the defaults were tuned on are this model's: a swapped file must fail here."""
    assert hashlib.sha256(silero_model_path().read_bytes()).hexdigest() == SILERO_SHA256


def test_one_sentence_is_one_speech_run(clip: Callable[[str], np.ndarray]) -> None:
    speech = np.concatenate([clip("short.wav"), np.zeros(16000, dtype=np.float32)])
    events = events_of(speech)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    start, end = events
    assert 0.0 <= start.sample / 16000 < 0.6
    assert 2.6 < end.sample / 16000 < 3.2


def test_silence_and_noise_have_no_speech(clip: Callable[[str], np.ndarray]) -> None:
    assert events_of(clip("silence.wav")) == []
    assert events_of(clip("noise.wav")) == []


def test_chunking_does_not_change_the_result(clip: Callable[[str], np.ndarray]) -> None:
    speech = clip("long.wav")[: 16000 * 12]
    assert events_of(speech, chunk=333) == events_of(speech, chunk=4000)


def test_quietest_sample_is_a_pause(clip: Callable[[str], np.ndarray]) -> None:
    stream = VadStream(SileroVad(), VadOptions(min_silence_ms=2000))
    speech = clip("long.wav")[: 16000 * 7]  # two sentences with a 0.5 s pause near 3.8 s
    stream.process(speech)
    cut = stream.quietest_sample(16000 * 2, 16000 * 6)
    assert cut is not None and 3.4 < cut / 16000 < 4.2
