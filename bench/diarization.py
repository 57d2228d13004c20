"""Speaker diarization: how often speech gets the wrong speaker, and what labelling costs.

Transcribes a clip whose manifest gives each turn's speaker twice: as a file (the CLI's and the file API's
path: ``offline.transcribe_file`` with a ``Diarizer``) and live (a ``LiveSession`` fed 0.1 s frames, with
``StreamSpeakers`` labelling its finals beside the decoder). For each it prints the diarization error: the
share of the reference's speech time not given its own speaker (after the best one-to-one mapping of
labels), split into confusion (another speaker's label) and missed (in no labelled final). Then the
diarizer's CPU seconds per audio second (process CPU time around its labelling, file path), as a ratio to
the machine factor (offline tiny.en on the same clip, same run), which it prints first.

Both paths cut utterances as diarized streams do (``diarization.turn_vad``).

    python bench/diarization.py                                # ../shared/audio/dialog.wav
    python bench/diarization.py --clip tests/data/dialog.wav   # the tests' 17 s cut of it
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_factor
from scipy.optimize import linear_sum_assignment

from streamscribe.audio import audio_file_seconds, iter_audio_file
from streamscribe.config import Settings
from streamscribe.engines import SAMPLE_RATE
from streamscribe.engines.base import Engine
from streamscribe.engines.registry import EngineRegistry
from streamscribe.offline import FileOptions, file_utterances, transcribe_file
from streamscribe.streaming.diarization import (
    Diarizer,
    SpeakerModel,
    StreamSpeakers,
    load_speaker_model,
    turn_vad,
)
from streamscribe.streaming.scheduler import window_scheduler
from streamscribe.streaming.segmenter import Segmenter, Utterance
from streamscribe.streaming.session import FinalText, SessionEvent, SessionOptions
from streamscribe.streaming.vad import SileroVad
from streamscribe.streaming.windows import window_session

ROOT = Path(__file__).resolve().parent.parent
FRAME = 0.01  # seconds: the resolution of the error
Span = tuple[float, float, str]


def diarization_error(reference: list[Span], hypothesis: list[Span], seconds: float) -> dict[str, float]:
    """Share of reference speech not given its speaker after the best label mapping; 10 ms frames."""
    frames = int(np.ceil(seconds / FRAME)) + 1

    def labels(spans: list[Span]) -> tuple[np.ndarray, list[str]]:
        names = sorted({name for _, _, name in spans})
        track = np.full(frames, -1)
        for start, end, name in spans:
            track[int(start / FRAME) : int(end / FRAME)] = names.index(name)
        return track, names

    ref, ref_names = labels(reference)
    hyp, hyp_names = labels(hypothesis)
    speech = ref >= 0
    overlap = np.zeros((len(ref_names), max(1, len(hyp_names))))
    for r, h in zip(ref[speech], hyp[speech], strict=True):
        if h >= 0:
            overlap[r, h] += 1
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    correct = overlap[rows, cols].sum()
    missed = float(np.sum(hyp[speech] < 0))
    total = float(speech.sum())
    return {
        "diarization_error": round((total - correct) / total, 4),
        "confusion": round((total - correct - missed) / total, 4),
        "missed": round(missed / total, 4),
    }


def _reference(clip: Path) -> list[Span]:
    manifest = json.loads((clip.parent / "manifest.json").read_text())
    (item,) = [item for item in manifest["items"] if item["path"] == clip.name]
    return [(s["start"], s["end"], s["speaker"]) for s in item["segments"]]


def _utterances(clip: Path, settings: Settings, rate: int) -> Iterator[Utterance]:
    segmenter = Segmenter(SileroVad(), turn_vad(settings.vad), settings.streaming.max_segment_seconds, rate)
    return file_utterances(iter_audio_file(clip, rate), segmenter)


def file_path(clip: Path, engine: Engine, settings: Settings, diarizer: Diarizer) -> list[Span]:
    """The file's labelled pieces."""
    options = FileOptions(prompt_chars=settings.streaming.prompt_chars, diarization=True)
    pieces = transcribe_file(
        _utterances(clip, settings, engine.sample_rate), engine, options, label=diarizer.label
    )
    return [(p.start, p.end, p.speaker) for p in pieces if p.speaker]


def diarizer_cpu(clip: Path, settings: Settings, model: SpeakerModel, runs: int = 3) -> float:
    """CPU seconds the diarizer takes to label the file's utterances, timed alone (an engine's idle
    threads, ctranslate2's OpenMP spin, would be counted in process time if decodes came between), the
    least of ``runs`` (torch's threads spin too when the machine is busy)."""
    utterances = list(_utterances(clip, settings, SAMPLE_RATE))
    times = []
    for _ in range(runs):
        diarizer = Diarizer(model)
        started = time.process_time()
        for utterance in utterances:
            diarizer.label(utterance.samples)
        times.append(time.process_time() - started)
    return min(times)


async def live_path(clip: Path, engine: Engine, settings: Settings, diarizer: Diarizer) -> list[Span]:
    """The finals of a live session fed the clip in 0.1 s frames, as fast as it takes them."""
    finals: list[FinalText] = []

    async def emit(event: SessionEvent) -> None:
        if isinstance(event, FinalText):
            finals.append(event)

    scheduler = window_scheduler(engine, workers=1, max_batch=1, overload_seconds=60.0)
    options = SessionOptions(
        vad=turn_vad(settings.vad), max_segment_seconds=settings.streaming.max_segment_seconds
    )
    session = window_session(scheduler, SileroVad(), options, emit, engine.sample_rate)
    session.label_speakers(StreamSpeakers(diarizer))
    for chunk in iter_audio_file(clip, engine.sample_rate):
        for start in range(0, len(chunk), engine.sample_rate // 10):
            await session.feed(chunk[start : start + engine.sample_rate // 10])
    await session.flush()
    await session.close()
    await scheduler.close()
    return [(f.start, f.end, f.speaker) for f in finals if f.speaker]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clip", type=Path, default=ROOT.parent / "shared" / "audio" / "dialog.wav")
    args = parser.parse_args()
    factor = machine_factor(args.clip)
    print(json.dumps(factor))
    settings = Settings()
    engine = EngineRegistry(settings).get("whisper", "standard", "en")
    started = time.process_time()
    model = load_speaker_model()
    load_cpu = time.process_time() - started
    seconds = audio_file_seconds(args.clip)
    reference = _reference(args.clip)
    cpu = diarizer_cpu(args.clip, settings, model)
    file_spans = file_path(args.clip, engine, settings, Diarizer(model))
    live_spans = asyncio.run(live_path(args.clip, engine, settings, Diarizer(model)))
    per_second = cpu / seconds
    offline = factor["machine_factor"]["offline_cpu_s_per_audio_s"]
    result: dict[str, Any] = {
        "clip": args.clip.name,
        "file": diarization_error(reference, file_spans, seconds)
        | {"speakers": len({s for *_, s in file_spans})},
        "live": diarization_error(reference, live_spans, seconds)
        | {"speakers": len({s for *_, s in live_spans})},
        "diarizer_cpu_s_per_audio_s": round(per_second, 4),
        "diarizer_cpu_times_offline": round(per_second / offline, 4),
        "model_load_cpu_s": round(load_cpu, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
