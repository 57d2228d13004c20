"""The one segmenter live streams and files share, on real speech and the real VAD."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest

from streamscribe.streaming.segmenter import Segmenter, Utterance
from streamscribe.streaming.vad import SileroVad, VadOptions


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


def segment(
    vad: SileroVad, samples: np.ndarray, max_seconds: float = 15.0, piece: int = 1600
) -> list[Utterance]:
    segmenter = Segmenter(vad, VadOptions(), max_seconds, 16000)
    closed = [
        u for start in range(0, len(samples), piece) for u in segmenter.feed(samples[start : start + piece])
    ]
    return closed + segmenter.flush()


def test_speech_without_pauses_is_cut_at_quiet_moments_and_nothing_is_lost(
    vad: SileroVad, clip: Callable[[str], np.ndarray]
) -> None:
    speech = clip("continuous.wav")  # 56 s with no pause the VAD ends an utterance on
    utterances = segment(vad, speech)
    assert len(utterances) >= 4
    assert all(len(u.samples) == u.end - u.start for u in utterances)
    assert max(u.end - u.start for u in utterances) <= 15 * 16000
    for before, after in itertools.pairwise(utterances):
        assert before.end <= after.start
    cuts = [(b, a) for b, a in itertools.pairwise(utterances) if b.end == a.start]
    assert cuts, "no utterance was cut"
    for before, _ in cuts:
        # At a quiet moment: the 32 ms around the cut is quieter than the utterance as a whole.
        around = speech[before.end - 256 : before.end + 256]
        assert np.sqrt(np.mean(around**2)) < np.sqrt(np.mean(before.samples**2))
    np.testing.assert_array_equal(utterances[0].samples, speech[utterances[0].start : utterances[0].end])


def test_pieces_of_any_size_give_the_same_utterances(
    vad: SileroVad, clip: Callable[[str], np.ndarray]
) -> None:
    speech = np.concatenate([clip("long.wav")[: 16000 * 30], clip("continuous.wav")[: 16000 * 40]])
    bounds = [
        [(u.start, u.end) for u in segment(vad, speech, piece=piece)] for piece in (160, 1600, 16000 * 7)
    ]
    assert bounds[0] == bounds[1] == bounds[2]
    assert len(bounds[0]) >= 5


def test_silence_gives_no_utterance_and_holds_no_audio(
    vad: SileroVad, clip: Callable[[str], np.ndarray]
) -> None:
    segmenter = Segmenter(vad, VadOptions(), 15.0, 16000)
    for _ in range(60):  # ten minutes
        assert segmenter.feed(clip("silence.wav")) == []
    assert segmenter.flush() == []
    assert len(segmenter.buffer) <= 16000


def test_flush_closes_the_open_utterance_and_drops_a_click(
    vad: SileroVad, clip: Callable[[str], np.ndarray]
) -> None:
    speech = clip("short.wav")
    segmenter = Segmenter(vad, VadOptions(), 15.0, 16000)
    assert segmenter.feed(speech[: 16000 * 2]) == []
    assert segmenter.open_start is not None
    (utterance,) = segmenter.flush()
    assert utterance.end == 16000 * 2 and segmenter.open_start is None
    click = Segmenter(vad, VadOptions(min_speech_ms=250), 15.0, 16000)
    click.feed(np.concatenate([np.zeros(16000, np.float32), speech[16000 : 16000 + 2400]]))
    assert click.flush() == []
