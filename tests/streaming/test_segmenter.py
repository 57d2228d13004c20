"""The one segmenter live streams and files share, on real speech and the real VAD."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from streamscribe.streaming.segmenter import (
    Closed,
    Dropped,
    Grew,
    Opened,
    Segmenter,
    Utterance,
    UtteranceEvent,
)
from streamscribe.streaming.vad import SileroVad, VadOptions


def closed(events: list[UtteranceEvent]) -> list[Utterance]:
    return [event.utterance for event in events if isinstance(event, Closed)]


def segment(
    vad: SileroVad,
    samples: np.ndarray,
    max_seconds: float = 15.0,
    piece: int = 1600,
    options: VadOptions | None = None,
) -> list[Utterance]:
    segmenter = Segmenter(vad, options or VadOptions(), max_seconds, 16000)
    events = [
        e for start in range(0, len(samples), piece) for e in segmenter.feed(samples[start : start + piece])
    ]
    return closed(events + segmenter.flush())


def test_speech_without_pauses_is_cut_at_quiet_moments_and_nothing_is_lost(
    vad: SileroVad, clip: Callable[[str], np.ndarray]
) -> None:
    speech = clip("continuous.wav")  # 56 s with no pause the VAD ends an utterance on
    utterances = segment(vad, speech, options=VadOptions(pause_cut_ms=0))  # only the length limit cuts
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


def test_continuous_speech_is_closed_in_the_short_pause_after_a_sentence_or_two(
    vad: SileroVad, clip: Callable[[str], np.ndarray], manifest: dict
) -> None:
    speech = clip("continuous.wav")
    utterances = segment(vad, speech)
    ends = [s["end"] for s in manifest["continuous.wav"]["segments"]]
    assert len(utterances) >= 8  # of 20 sentences; the length limit alone closes 5 utterances
    assert max(u.end - u.start for u in utterances) <= 10 * 16000
    cuts = [b.end for b, a in itertools.pairwise(utterances) if b.end == a.start]
    assert len(cuts) >= 7
    # In a breath: between two sentences (or at a comma), never inside a word.
    at_sentence_end = [min(abs(cut / 16000 - end) for end in ends) <= 0.3 for cut in cuts]
    assert sum(at_sentence_end) >= 0.8 * len(cuts)
    for cut in cuts:
        around = speech[cut - 768 : cut + 768]
        assert np.sqrt(np.mean(around**2)) < 0.5 * np.sqrt(np.mean(speech**2)), cut / 16000
    assert sum(u.end - u.start for u in utterances) >= len(speech) - 16000  # nothing lost at a cut


def test_a_long_sentence_is_not_cut_inside_its_words_before_the_length_limit(
    vad: SileroVad, clip: Callable[[str], np.ndarray]
) -> None:
    speech = clip("long_sentence.wav")
    # Only where speech pauses: each cut made before the length limit is quiet for 96 ms around it.
    for before, after in itertools.pairwise(segment(vad, speech)):
        if before.end == after.start and before.end - before.start < 15 * 16000 - 16 * 512:
            around = speech[before.end - 768 : before.end + 768]
            assert np.sqrt(np.mean(around**2)) < 0.5 * np.sqrt(np.mean(before.samples**2))


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
    assert closed(segmenter.feed(speech[: 16000 * 2])) == []
    assert segmenter.open_start is not None
    (utterance,) = closed(segmenter.flush())
    assert utterance.end == 16000 * 2 and segmenter.open_start is None
    click = Segmenter(vad, VadOptions(min_speech_ms=250), 15.0, 16000)
    click.feed(np.concatenate([np.zeros(16000, np.float32), speech[16000 : 16000 + 2400]]))
    assert click.flush() == [Dropped()]


def test_events_report_each_utterance_and_all_of_its_audio_in_order(
    vad: SileroVad, clip: Callable[[str], np.ndarray]
) -> None:
    """What a native stream consumes: every closed utterance was opened, and grew by exactly its audio."""
    speech = clip("continuous.wav")[: 16000 * 40]
    segmenter = Segmenter(vad, VadOptions(), 15.0, 16000)
    events = [
        e for start in range(0, len(speech), 1600) for e in segmenter.feed(speech[start : start + 1600])
    ]
    events += segmenter.flush()
    open_at: int | None = None
    heard = np.zeros(0, np.float32)
    utterances = 0
    for event in events:
        if isinstance(event, Opened):
            assert open_at is None and event.index == utterances
            open_at, heard = event.start, np.zeros(0, np.float32)
        elif isinstance(event, Grew):
            assert open_at is not None and event.start == open_at + len(heard)
            heard = np.concatenate([heard, event.samples])
        elif isinstance(event, Closed):
            utterance = event.utterance
            assert utterance.start == open_at and utterance.index == utterances
            # Grew reported at least the utterance's audio (the VAD ends it behind the latest sample).
            np.testing.assert_array_equal(heard[: len(utterance.samples)], utterance.samples)
            open_at, utterances = None, utterances + 1
        else:
            open_at = None
    assert open_at is None and utterances >= 3
