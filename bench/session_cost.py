"""What one stream costs the engine, measured without a socket and without a wall clock.

Feeds a clip to a live session (re-decoded windows) in 0.1 s frames and, after each frame, lets every
decode the policy wants finish before the next frame arrives (a server that always keeps up). Prints
decode counts, CPU seconds per audio second (process CPU time, so a busy machine does not distort it
much) and the WER of the finals. Use it to compare policy and engine settings quickly:

    python bench/session_cost.py --clip tests/data/long.wav
    STREAMSCRIBE_WHISPER__BEAM_SIZE=1 python bench/session_cost.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jiwer
import numpy as np
from machine import machine_factor

from streamscribe.config import Settings
from streamscribe.engines.base import AudioWindow, Engine, Transcript
from streamscribe.engines.registry import EngineRegistry
from streamscribe.streaming.scheduler import window_scheduler
from streamscribe.streaming.segmenter import Segmenter
from streamscribe.streaming.session import FinalText, LiveSession, SessionEvent, SessionOptions
from streamscribe.streaming.vad import SileroVad
from streamscribe.streaming.windows import WindowDecoder

ROOT = Path(__file__).resolve().parent.parent


class CountingEngine:
    """Wraps an engine to count decodes and their audio by kind."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.name = engine.name
        self.sample_rate = engine.sample_rate
        self.languages = engine.languages
        self.busy = False
        self.counts = {"partial": 0, "final": 0}
        self.seconds = {"partial": 0.0, "final": 0.0}
        self.cpu = {"partial": 0.0, "final": 0.0}

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        for window in batch:
            kind = "final" if window.final else "partial"
            self.counts[kind] += 1
            self.seconds[kind] += len(window.samples) / self.sample_rate
        self.busy = True
        started = time.process_time()
        try:
            return self.engine.transcribe(batch)
        finally:
            self.cpu["final" if batch[0].final else "partial"] += time.process_time() - started
            self.busy = False


async def run(
    samples: np.ndarray, settings: Settings, language: str, partial_interval: float
) -> tuple[CountingEngine, list[str], float]:
    engine = CountingEngine(EngineRegistry(settings).get("whisper", "standard", language))
    finals: list[str] = []

    async def emit(event: SessionEvent) -> None:
        if isinstance(event, FinalText):
            finals.append(event.text)

    options = SessionOptions(
        language=language,
        partial_interval=partial_interval,
        max_segment_seconds=settings.streaming.max_segment_seconds,
        prompt_chars=settings.streaming.prompt_chars,
        vad=settings.vad,
    )
    scheduler = window_scheduler(engine, workers=settings.decode_worker_count)  # type: ignore[arg-type]
    segmenter = Segmenter(SileroVad(), options.vad, options.max_segment_seconds, engine.sample_rate)
    decoder = WindowDecoder(scheduler, segmenter, options)
    session = LiveSession(segmenter, decoder, options, emit)
    started = time.process_time()
    for start in range(0, len(samples), 1600):
        await session.feed(samples[start : start + 1600])
        for _ in range(3):  # settle: every decode the policy wants is done before more audio comes
            await asyncio.sleep(0.002)
            while engine.busy or scheduler.queued or decoder.wants_partial():
                await asyncio.sleep(0.002)
    await session.flush()
    cpu = time.process_time() - started
    await session.close()
    await scheduler.close()
    return engine, finals, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clip", type=Path, default=ROOT / "tests" / "data" / "long.wav")
    parser.add_argument("--language", default="en")
    parser.add_argument("--partial-interval", type=float, default=SessionOptions().partial_interval)
    args = parser.parse_args()
    from streamscribe.audio import load_audio_file

    # First the machine factor: the cost below reads as a ratio to this machine's offline cost.
    factor = machine_factor(args.clip)
    print(json.dumps(factor))
    offline = factor["machine_factor"]["offline_cpu_s_per_audio_s"]
    samples = load_audio_file(args.clip)
    items = json.loads((args.clip.parent / "manifest.json").read_text())["items"]
    reference = next(i["reference"] for i in items if i["path"] == args.clip.name)
    engine, finals, cpu = asyncio.run(run(samples, Settings(), args.language, args.partial_interval))
    duration = len(samples) / 16000

    def words(text: str) -> str:
        return " ".join("".join(c for c in w if c.isalnum() or c == "'") for w in text.lower().split())

    print(
        json.dumps(
            {
                "audio_s": round(duration, 1),
                "partial_decodes": engine.counts["partial"],
                "final_decodes": engine.counts["final"],
                "partial_audio_s": round(engine.seconds["partial"], 1),
                "cpu_s_per_audio_s": round(cpu / duration, 4),
                "cpu_times_offline": round(cpu / duration / offline, 2),
                "partial_cpu_s": round(engine.cpu["partial"], 2),
                "final_cpu_s": round(engine.cpu["final"], 2),
                "wer": round(jiwer.wer(words(reference), words(" ".join(finals))), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
