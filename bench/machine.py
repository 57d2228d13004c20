"""The machine factor every benchmark prints first: what offline transcription costs on this machine.

Machines differ (the same code ran 1.9 times slower on one than on another), so a figure from a
benchmark means little alone. Each run measures the offline cost of the same model on a clip, in CPU
seconds per audio second, in the same process and run; other figures are read as ratios to it.

    python bench/machine.py                   # tiny.en on tests/data/long.wav
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import jiwer

ROOT = Path(__file__).resolve().parent.parent
_WORD = re.compile(r"[a-z0-9']+")
_NUMBERS = {"20": "twenty", "2": "two", "4": "four"}


def words(text: str) -> list[str]:
    """The words WER is counted on: lower case, no punctuation, the clips' few numbers spelled out."""
    return [_NUMBERS.get(w, w) for w in _WORD.findall(text.lower())]


def machine_factor(
    clip: Path = ROOT / "tests" / "data" / "long.wav", model: str = "whisper", reference: str | None = None
) -> dict[str, Any]:
    """Offline cost of ``model`` on ``clip`` with the server's settings (one decode worker, the file
    path of the CLI): CPU seconds per audio second, and wall seconds per audio second. With the clip's
    ``reference`` text, also the WER of that transcript: what the file API gets on it."""
    from streamscribe.audio import audio_file_seconds, iter_audio_file
    from streamscribe.config import Settings
    from streamscribe.engines.registry import EngineRegistry
    from streamscribe.offline import FileOptions, file_utterances, transcribe_file
    from streamscribe.streaming.segmenter import Segmenter
    from streamscribe.streaming.vad import SileroVad

    settings = Settings()
    engine = EngineRegistry(settings).get(model, "standard", "en")
    seconds = audio_file_seconds(clip)
    segmenter = Segmenter(
        SileroVad(), settings.vad, settings.streaming.max_segment_seconds, engine.sample_rate
    )
    cpu, wall = time.process_time(), time.perf_counter()
    options = FileOptions(prompt_chars=settings.streaming.prompt_chars)
    utterances = file_utterances(iter_audio_file(clip, engine.sample_rate), segmenter)
    text = " ".join(piece.text for piece in transcribe_file(utterances, engine, options))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    factor: dict[str, Any] = {
        "machine_factor": {
            "engine": engine.name,
            "clip": clip.name,
            "offline_cpu_s_per_audio_s": round(cpu / seconds, 4),
            "offline_wall_s_per_audio_s": round(wall / seconds, 4),
            "cores": os.cpu_count(),
        }
    }
    if reference is not None:
        wer = jiwer.wer(" ".join(words(reference)), " ".join(words(text)))
        factor["machine_factor"]["offline_wer"] = round(wer, 4)
    return factor


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clip", type=Path, default=ROOT / "tests" / "data" / "long.wav")
    parser.add_argument("--model", default="whisper")
    args = parser.parse_args()
    print(json.dumps(machine_factor(args.clip, args.model)))
