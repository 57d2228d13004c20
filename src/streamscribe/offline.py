"""Whole-file transcription: the live streams' segmenter cuts the file into utterances as it is decoded,
grouped into windows the engine decodes."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from streamscribe.engines.base import AudioWindow, Engine, Transcript, Word
from streamscribe.streaming.segmenter import Segmenter, Utterance


@dataclass(frozen=True)
class TimedText:
    """Attributes: start and end in seconds of the file; the text spoken between them; its words (with
    times in seconds of the file) when word timestamps were asked for."""

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class FileOptions:
    """How a whole file is transcribed.

    Attributes:
        language: Spoken language.
        task: "transcribe", or "translate" to English.
        prompt: Text that conditions the first window (vocabulary, spelling, style).
        word_timestamps: Whether pieces carry their words' timing.
        temperature: A fixed sampling temperature; None for the engine's default fallback schedule.
        prompt_chars: Characters of the text so far given to each window as context.
    """

    language: str = "en"
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt: str | None = None
    word_timestamps: bool = False
    temperature: float | None = None
    prompt_chars: int = 200


@dataclass(frozen=True)
class SpeechWindow:
    """Neighbouring utterances of a file decoded together (the silence between them zeroed).

    Attributes:
        start: Index of its first sample in the file.
        samples: Its audio.
    """

    start: int
    samples: np.ndarray

    @property
    def end(self) -> int:
        return self.start + len(self.samples)


def _joined(utterances: list[Utterance]) -> SpeechWindow:
    start = utterances[0].start
    samples = np.zeros(utterances[-1].end - start, dtype=np.float32)
    for utterance in utterances:
        samples[utterance.start - start : utterance.end - start] = utterance.samples
    return SpeechWindow(start, samples)


def speech_windows(
    chunks: Iterable[np.ndarray], segmenter: Segmenter, max_seconds: float = 25.0
) -> Iterator[SpeechWindow]:
    """The file's utterances, cut by the same rules as a live stream's, with neighbours merged up to
    ``max_seconds`` per window: Whisper decodes better and faster with more context per window. Only
    the open utterance and the window being built are held, however long the file."""
    limit = int(max_seconds * segmenter.rate)
    pending: list[Utterance] = []
    for chunk in itertools.chain(chunks, [None]):
        utterances = segmenter.feed(chunk) if chunk is not None else segmenter.flush()
        for utterance in utterances:
            if pending and utterance.end - pending[0].start > limit:
                yield _joined(pending)
                pending = []
            pending.append(utterance)
    if pending:
        yield _joined(pending)


def _window(samples: np.ndarray, pieces: list[TimedText], options: FileOptions) -> AudioWindow:
    previous = " ".join(p.text for p in pieces)[-options.prompt_chars :] if options.prompt_chars else ""
    prompt = " ".join(part for part in (options.prompt, previous) if part) or None
    return AudioWindow(
        samples,
        language=options.language,
        final=True,
        prompt=prompt,
        word_timestamps=options.word_timestamps,
        task=options.task,
        temperature=options.temperature,
    )


def _piece(window: SpeechWindow, rate: int, transcript: Transcript) -> TimedText:
    offset = window.start / rate
    words = tuple(Word(w.text, w.start + offset, w.end + offset, w.probability) for w in transcript.words)
    return TimedText(offset, window.end / rate, transcript.text, words)


def transcribe_file(
    windows: Iterator[SpeechWindow],
    engine: Engine,
    options: FileOptions,
    progress: Callable[[float], None] | None = None,
) -> list[TimedText]:
    """Transcribe a whole recording; ``progress`` receives the seconds of audio done so far."""
    pieces: list[TimedText] = []
    for window in windows:
        (transcript,) = engine.transcribe([_window(window.samples, pieces, options)])
        if transcript.text:
            pieces.append(_piece(window, engine.sample_rate, transcript))
        if progress:
            progress(window.end / engine.sample_rate)
    return pieces


async def transcribe_file_async(
    windows: Iterator[SpeechWindow],
    decode: Callable[[AudioWindow], Awaitable[Transcript]],
    options: FileOptions,
    rate: int = 16000,
) -> list[TimedText]:
    """Like ``transcribe_file`` for a server: the file is read and cut off the event loop, window by
    window, and each window goes through ``decode`` (the shared decode queue), so a long file takes
    turns with live streams instead of holding the engine."""
    pieces: list[TimedText] = []
    while (window := await asyncio.to_thread(next, windows, None)) is not None:
        transcript = await decode(_window(window.samples, pieces, options))
        if transcript.text:
            pieces.append(_piece(window, rate, transcript))
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
