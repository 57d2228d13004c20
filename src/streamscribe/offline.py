"""Whole-file transcription: VAD cuts the file into utterances, grouped into windows the engine decodes."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from streamscribe.engines.base import AudioWindow, Engine
from streamscribe.streaming.vad import SileroVad, SpeechEnd, SpeechStart, VadOptions, VadStream


@dataclass(frozen=True)
class TimedText:
    """Attributes: start and end in seconds of the file; the text spoken between them."""

    start: float
    end: float
    text: str


def speech_windows(
    samples: np.ndarray, vad: SileroVad, options: VadOptions, max_seconds: float = 25.0, rate: int = 16000
) -> Iterator[tuple[int, int]]:
    """(start, end) sample ranges of speech, neighbours merged up to ``max_seconds`` per window."""
    stream = VadStream(vad, options)
    pad = options.speech_pad_ms * rate // 1000
    min_speech = options.min_speech_ms * rate // 1000
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for event in stream.process(samples):
        if isinstance(event, SpeechStart):
            start = event.sample
        elif isinstance(event, SpeechEnd) and start is not None:
            if event.duration >= min_speech:
                spans.append((max(0, start - pad), min(len(samples), event.sample + pad)))
            start = None
    if start is not None:
        spans.append((max(0, start - pad), len(samples)))
    limit = int(max_seconds * rate)
    window: tuple[int, int] | None = None
    for span in spans:
        if window and span[1] - window[0] <= limit:
            window = (window[0], span[1])
            continue
        if window:
            yield window
        window = span
    if window:
        yield window


def transcribe_samples(
    samples: np.ndarray,
    engine: Engine,
    vad: SileroVad,
    language: str,
    vad_options: VadOptions | None = None,
    progress: Callable[[float], None] | None = None,
) -> list[TimedText]:
    """Transcribe a whole recording; ``progress`` receives the seconds of audio done so far."""
    rate = engine.sample_rate
    pieces: list[TimedText] = []
    for start, end in speech_windows(samples, vad, vad_options or VadOptions(), rate=rate):
        prompt = " ".join(p.text for p in pieces)[-200:] or None
        window = AudioWindow(samples[start:end], language=language, final=True, prompt=prompt)
        (transcript,) = engine.transcribe([window])
        if transcript.text:
            pieces.append(TimedText(start / rate, end / rate, transcript.text))
        if progress:
            progress(end / rate)
    if progress:
        progress(len(samples) / rate)
    return pieces


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def render(pieces: list[TimedText], output_format: str) -> str:
    """The transcript as txt, srt, vtt or json."""
    if output_format == "txt":
        return " ".join(p.text for p in pieces) + "\n"
    if output_format == "json":
        return (
            json.dumps(
                {"text": " ".join(p.text for p in pieces), "segments": [asdict(p) for p in pieces]}, indent=2
            )
            + "\n"
        )
    if output_format == "srt":
        blocks = [
            f"{i}\n{_timestamp(p.start, ',')} --> {_timestamp(p.end, ',')}\n{p.text}\n"
            for i, p in enumerate(pieces, 1)
        ]
        return "\n".join(blocks)
    if output_format == "vtt":
        blocks = [f"{_timestamp(p.start, '.')} --> {_timestamp(p.end, '.')}\n{p.text}\n" for p in pieces]
        return "WEBVTT\n\n" + "\n".join(blocks)
    raise ValueError(f"unknown output format {output_format!r}")
