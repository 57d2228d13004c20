"""The narrow interface every speech engine implements, and the values it exchanges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Word:
    """A recognised word.

    Attributes:
        text: The word as the engine wrote it, with its leading space if any.
        start: Start in seconds from the start of the window.
        end: End in seconds from the start of the window.
        probability: The engine's confidence, 0..1.
    """

    text: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class AudioWindow:
    """One piece of audio to transcribe, with how to decode it.

    Attributes:
        samples: Mono float32 samples at the engine's sample rate.
        language: Source language code ("en", "es", ...).
        final: True for text that will be final (worth a wider beam); False for a quick partial.
        prompt: Previous text of the stream, given as context where the engine supports it.
        prefix: Text the window is known to start with (a partial's stable words): the engine continues
            after it instead of decoding it again, where it supports that.
        word_timestamps: Whether to return per-word timing.
        fast: Decode cheaply even if final: one pass, no fallback, a small beam or none (set by the
            scheduler when it is behind).
        task: "transcribe", or "translate" (to English) where the engine supports it.
        hotwords: Words or phrases to favour (custom vocabulary), where the engine supports it.
        temperature: A fixed sampling temperature; None for the engine's default.
    """

    samples: np.ndarray
    language: str
    final: bool = True
    prompt: str | None = None
    prefix: str | None = None
    word_timestamps: bool = False
    fast: bool = False
    task: Literal["transcribe", "translate"] = "transcribe"
    hotwords: str | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class Transcript:
    """An engine's text for one window.

    Attributes:
        text: The recognised text, stripped.
        language: The language the text is in.
        words: Per-word timing when asked for (seconds from the start of the window).
    """

    text: str
    language: str
    words: tuple[Word, ...] = field(default_factory=tuple)


class EngineUnavailable(RuntimeError):
    """An engine cannot run here: a package or the weights are missing. The message says which."""


class UnsupportedLanguage(EngineUnavailable):
    """The engine runs here, but not for the requested language."""


@runtime_checkable
class Engine(Protocol):
    """A loaded speech model. Implementations are thread-safe for ``transcribe``."""

    @property
    def name(self) -> str:
        """Identity reported to clients, e.g. ``whisper-tiny.en`` or ``parakeet-onnx``."""
        ...

    @property
    def sample_rate(self) -> int: ...

    @property
    def languages(self) -> frozenset[str]: ...

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        """Transcribe each window; one result per window, in order."""
        ...


class EngineStream(Protocol):
    """One live utterance inside a streaming engine: the handle owns the engine's state for it.

    Made by ``StreamingEngine.open_stream``; its audio goes in through ``StreamingEngine.stream_step``.
    """

    def finish(self) -> None:
        """The next piece stepped is the stream's last: after that step all of its text is final."""
        ...

    def close(self) -> None:
        """Abandon the stream and its text; the engine frees its state by its next step at the latest.
        Quick, safe from any thread and more than once."""
        ...


@dataclass(frozen=True)
class StreamUpdate:
    """What one step added to a stream's text.

    Attributes:
        final_text: Text that became final in this step (never revised), stripped; often empty.
        partial_text: The stream's text after its last final piece; revised by later steps.
    """

    final_text: str
    partial_text: str


@runtime_checkable
class StreamingEngine(Engine, Protocol):
    """An engine that decodes live audio natively, piece by piece, several streams per step.

    Calls to ``stream_step`` are serialised by the caller (one at a time); each stream appears at most
    once per call.
    """

    @property
    def chunk_samples(self) -> int:
        """Samples per piece (at ``sample_rate``)."""
        ...

    def open_stream(self, language: str) -> EngineStream:
        """A new stream of speech in ``language``; its state is made at its first step."""
        ...

    def stream_step(self, pieces: Sequence[tuple[EngineStream, np.ndarray]]) -> list[StreamUpdate]:
        """Advance each stream by its piece: ``chunk_samples`` long, except a finishing stream's last piece,
        which may be shorter or empty. One update per piece, in order."""
        ...
