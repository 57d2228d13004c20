"""faster-whisper (CTranslate2): the embedded default engine, running on any CPU with bundled weights."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from faster_whisper.tokenizer import _LANGUAGE_CODES
from threadpoolctl import threadpool_limits

from streamscribe.engines.base import AudioWindow, EngineUnavailable, Transcript, Word
from streamscribe.engines.bundled import BUNDLED_WHISPER_MODELS

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
_FRAMES_PER_SECOND = 100  # Whisper's mel hop is 10 ms


def resolve_model_dir(model: str, cache_dir: Path) -> tuple[str, Path]:
    """(short name, folder) for a bundled model name or a local CTranslate2 Whisper folder."""
    if model in BUNDLED_WHISPER_MODELS:
        return model, BUNDLED_WHISPER_MODELS[model].locate(cache_dir)
    folder = Path(model).expanduser()
    if not (folder / "model.bin").is_file():
        raise EngineUnavailable(
            f"Whisper model {model!r} is neither a bundled model ({', '.join(BUNDLED_WHISPER_MODELS)}) "
            "nor a folder holding a CTranslate2 model.bin"
        )
    return folder.name, folder


def _load_whisper_class() -> type:
    try:
        from faster_whisper import WhisperModel
    except ImportError as exc:  # pragma: no cover - faster-whisper is a core dependency
        raise EngineUnavailable(f"faster-whisper is not installed: {exc}") from exc

    class SizedEncoderWhisperModel(WhisperModel):
        """Encodes a short window in the smallest of a few sizes instead of Whisper's fixed 3000 frames.

        faster-whisper zero-pads every window to 30 s; the encoder's cost grows faster than linearly with
        its input, so a 3 s utterance encoded as 15 s costs about a fifth of the padded 30 s. The size for
        the current call is per thread (``sizes.frames``): decode workers run calls side by side.
        """

        sizes = threading.local()

        def encode(self, features: np.ndarray) -> Any:
            floor = getattr(self.sizes, "frames", 3000)
            if features.ndim == 2 and features.shape[-1] > floor:
                used = np.flatnonzero(np.any(features != 0, axis=0))
                content = int(used[-1]) + 1 if len(used) else 0
                size = next((s for s in (floor, 1500) if content <= s), features.shape[-1])
                features = features[:, :size]
            return super().encode(features)

    return SizedEncoderWhisperModel


class WhisperEngine:
    """One loaded CTranslate2 Whisper model, shared by every session that uses it."""

    def __init__(
        self,
        model: str,
        cache_dir: Path,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 0,
        workers: int = 1,
        beam_size: int = 5,
        min_encoder_seconds: float = 15.0,
        partial_encoder_seconds: float = 10.0,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # faster-whisper's mel filterbank is a NumPy matmul: a second OpenBLAS thread would spin beside
        # every decode and double its CPU time for no speed (measured: 0.19 -> 0.09 CPU s per partial).
        threadpool_limits(1, user_api="blas")
        short_name, folder = resolve_model_dir(model, cache_dir)
        model_class = _load_whisper_class()
        log.info("loading Whisper model %s from %s on %s (%s)", short_name, folder, device, compute_type)
        self._model = model_class(
            str(folder),
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads or max(1, (os.cpu_count() or 1) // workers),
            num_workers=workers,
            local_files_only=True,
        )
        self._final_frames = int(min_encoder_seconds * _FRAMES_PER_SECOND)
        self._partial_frames = int(partial_encoder_seconds * _FRAMES_PER_SECOND)
        self._name = f"whisper-{short_name}"
        self._beam_size = beam_size
        multilingual = bool(self._model.model.is_multilingual)
        self._languages = frozenset(_LANGUAGE_CODES) if multilingual else frozenset({"en"})

    @property
    def name(self) -> str:
        return self._name

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    @property
    def languages(self) -> frozenset[str]:
        return self._languages

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        return [self._transcribe_one(window) for window in batch]

    @staticmethod
    def _temperature(window: AudioWindow, thorough: bool) -> float | tuple[float, ...]:
        if window.temperature is not None:
            return window.temperature
        # Finals fall back to sampling when the greedy/beam text looks wrong (repetitions, low confidence).
        return (0.0, 0.2, 0.4, 0.6) if thorough else 0.0

    def _transcribe_one(self, window: AudioWindow) -> Transcript:
        if window.task == "translate" and self._languages == {"en"}:
            raise EngineUnavailable(f"{self._name} is English-only and cannot translate")
        thorough = window.final and not window.fast
        # Set before the (lazy) segments are iterated below, in this thread: encode() reads it.
        self._model.sizes.frames = self._final_frames if window.final else self._partial_frames
        segments, info = self._model.transcribe(
            window.samples,
            # Translation too is told the spoken language: with "en" (the protocol's default) Whisper still
            # writes English for foreign speech, and its own per-window detection is unreliable on short
            # utterances (base calls German "yi" and Spanish "it" on the test clips).
            language=window.language if self._languages != {"en"} else "en",
            task=window.task,
            beam_size=self._beam_size if thorough else 1,
            best_of=self._beam_size if thorough else 1,
            temperature=self._temperature(window, thorough),
            initial_prompt=window.prompt or None,
            prefix=window.prefix or None,
            hotwords=window.hotwords or None,
            condition_on_previous_text=False,
            word_timestamps=window.word_timestamps,
            without_timestamps=not window.word_timestamps,
            vad_filter=False,
        )
        words: list[Word] = []
        texts: list[str] = []
        for segment in segments:
            texts.append(segment.text)
            words.extend(
                Word(w.word, float(w.start), float(w.end), float(w.probability)) for w in segment.words or ()
            )
        text = "".join(texts).strip()
        if not any(character.isalnum() for character in text):
            text, words = "", []  # a lone "." or "..." is Whisper's way of hearing nothing
        return Transcript(text=text, language=info.language, words=tuple(words))
