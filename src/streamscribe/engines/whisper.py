"""faster-whisper (CTranslate2): the embedded default engine, running on any CPU with bundled weights."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from faster_whisper.tokenizer import _LANGUAGE_CODES, Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens
from threadpoolctl import threadpool_limits

from streamscribe.engines import SAMPLE_RATE
from streamscribe.engines.base import AudioWindow, EngineUnavailable, Transcript, Word
from streamscribe.engines.bundled import BUNDLED_WHISPER_MODELS
from streamscribe.engines.repetition import SpokenWord, find_repeated_run, is_spoken_twice, spoken_words

log = logging.getLogger(__name__)

_FRAMES_PER_SECOND = 100  # Whisper's mel hop is 10 ms
_MAX_TOKENS_PER_SECOND = 8  # fast speech is about 4 words, 5-6 tokens, a second
# Silence the encoder sees after the speech: without it Whisper does not hear the audio end and writes
# the last sentence again (11.5-16 s windows of the dev clips: 28 of 288 decodes; 5 of 144 with it).
_TAIL_FRAMES = 100


def resolve_model_dir(model: str, cache_dir: Path) -> tuple[str, Path]:
    """(short name, folder) for a bundled model name, a local CTranslate2 Whisper folder, or a model on the
    Hugging Face Hub: one of faster-whisper's names (``small.en``, ``large-v3-turbo``) or a repo id, taken
    from the Hugging Face cache, else downloaded into it once when the hub is allowed
    (``HF_HUB_OFFLINE=0``). Bundled models never touch the hub. Raises EngineUnavailable."""
    if model in BUNDLED_WHISPER_MODELS:
        return model, BUNDLED_WHISPER_MODELS[model].locate(cache_dir)
    folder = Path(model).expanduser()
    if (folder / "model.bin").is_file():
        return folder.name, folder
    _check_hub_name(model, folder)
    found = _cached_hub_model(model)
    if found is None:
        if hub_offline():
            raise EngineUnavailable(_offline_problem(model))
        from faster_whisper.utils import download_model

        log.info("downloading Whisper model %s into the Hugging Face cache (once)", model)
        try:
            found = Path(download_model(model))
        except Exception as exc:  # the hub's errors: unknown repo, no network, refused
            log.error("downloading Whisper model %s failed: %s: %s", model, type(exc).__name__, exc)
            raise EngineUnavailable(
                f"Whisper model {model!r} could not be downloaded: {type(exc).__name__} (see the server log)"
            ) from None
    if not (found / "model.bin").is_file():
        raise EngineUnavailable(f"Whisper model {model!r} from the hub holds no CTranslate2 model.bin")
    return model.rsplit("/", 1)[-1], found


def whisper_model_problem(model: str, cache_dir: Path) -> str | None:
    """Why a Whisper model setting cannot load here, found without downloading; None when it can (a hub
    model not cached yet can, while the hub is allowed: it downloads on first use)."""
    try:
        if model in BUNDLED_WHISPER_MODELS or (Path(model).expanduser() / "model.bin").is_file():
            resolve_model_dir(model, cache_dir)
            return None
        _check_hub_name(model, Path(model).expanduser())
    except EngineUnavailable as exc:
        return str(exc)
    if _cached_hub_model(model) is None and hub_offline():
        return _offline_problem(model)
    return None


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_hub_name(model: str, folder: Path) -> None:
    if folder.exists() or model.startswith((".", "/", "~")) or not is_hub_name(model):
        raise EngineUnavailable(
            f"Whisper model {model!r} is neither a bundled model ({', '.join(BUNDLED_WHISPER_MODELS)}), "
            "a folder holding a CTranslate2 model.bin, nor a faster-whisper name or Hugging Face repo id"
        )


def _cached_hub_model(model: str) -> Path | None:
    """The model's folder in the Hugging Face cache, or None; never asks the hub."""
    from faster_whisper.utils import download_model

    try:
        return Path(download_model(model, local_files_only=True))
    except Exception:  # huggingface_hub's "not in the cache" has several types across versions
        return None


def _offline_problem(model: str) -> str:
    return (
        f"Whisper model {model!r} is not in the Hugging Face cache and the hub is offline "
        "(HF_HUB_OFFLINE=1; with HF_HUB_OFFLINE=0 it is downloaded once)"
    )


def is_hub_name(model: str) -> bool:
    """One of faster-whisper's model names, or a Hugging Face repo id (``owner/name``)."""
    from faster_whisper.utils import available_models

    parts = model.split("/")
    return model in available_models() or (len(parts) == 2 and all(parts))


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
                size = _encoder_size(content, floor) or features.shape[-1]
                features = features[:, :size]
            return super().encode(features)

    return SizedEncoderWhisperModel


def _encoder_size(content: int, floor: int) -> int | None:
    """The encoder input, in frames, for ``content`` frames of audio: ``floor`` or 15 s, whichever holds
    it with a second of silence after it; None for longer windows, which keep Whisper's own 30 s."""
    return next((size for size in (floor, 1500) if content + _TAIL_FRAMES <= size), None)


def _max_new_tokens(window: AudioWindow) -> int:
    """A bound no real speech reaches: a hallucination loop otherwise runs to 448 tokens (about 0.7 s)."""
    return int(_MAX_TOKENS_PER_SECOND * len(window.samples) / SAMPLE_RATE) + 8


class WhisperEngine:
    """One loaded CTranslate2 Whisper model, shared by every session that uses it."""

    sample_rate = SAMPLE_RATE

    def __init__(
        self,
        model: str,
        cache_dir: Path,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 0,
        workers: int = 1,
        beam_size: int = 5,
        busy_beam_size: int = 3,
        min_encoder_seconds: float = 13.0,
        partial_encoder_seconds: float = 10.0,
    ) -> None:
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
        self.name = f"whisper-{short_name}"
        self._beam_size = beam_size
        self._busy_beam_size = busy_beam_size
        multilingual = bool(self._model.model.is_multilingual)
        self.languages = frozenset(_LANGUAGE_CODES) if multilingual else frozenset({"en"})
        self._tokenizers: dict[tuple[str, str], Tokenizer] = {}

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        """Quick windows (partials, greedy; finals while the server is behind, ``busy_beam_size``) of one
        encoder size are decoded together; the rest (beam search with fallback, word timing) one by one. A
        text that repeats itself is decoded again (see ``_without_repeats``).

        One CTranslate2 call for several windows turns each generated token's matrix-vector products into
        one matrix product: measured here, 5 s partials cost 0.098 CPU s each alone, 0.081 two together.
        """
        # Windows decoded together share an encoder size, a beam, and context or none (_aligned_prompts).
        groups: dict[tuple[int, int, bool] | None, list[int]] = {}
        for index, window in enumerate(batch):
            frames = self._encoder_frames(window) if self._is_quick(window) else None
            context = bool(window.prompt or window.hotwords)
            key = (frames, self._quick_beam(window), context) if frames else None
            groups.setdefault(key, []).append(index)
        results: dict[int, Transcript] = {}
        for key, indexes in groups.items():
            if key is None or len(indexes) == 1:
                results.update((index, self._transcribe_one(batch[index])) for index in indexes)
            else:
                transcripts = self._transcribe_together([batch[index] for index in indexes], key[0], key[1])
                results.update(zip(indexes, transcripts, strict=True))
        return [self._without_repeats(window, results[index]) for index, window in enumerate(batch)]

    def _without_repeats(self, window: AudioWindow, transcript: Transcript) -> Transcript:
        """Never a decoder's loop in the text: a phrase written again right after itself is checked
        against word timing; a loop (its copies squeezed where the audio ends) is decoded again with beam
        search that may not repeat a 3-word phrase, and a loop that survives even that is cut after its
        first copy."""
        if find_repeated_run(spoken_words(transcript.text)) is None:
            return transcript
        timed = transcript if window.word_timestamps else self._transcribe_one(window, timed=True)
        words = _timed_words(timed)
        run = find_repeated_run(words)
        if run is None or is_spoken_twice(words, run):
            return timed if window.word_timestamps else replace(timed, words=())
        log.info("repeated text in %s (%d words x%d): decoding again", self.name, run.length, run.times)
        transcript = self._transcribe_one(window, no_repeats=True)
        words = spoken_words(transcript.text)
        run = find_repeated_run(words)
        if run is None:
            return transcript
        keep = words[run.start + run.length - 1].text_end
        kept_words, written = [], 0
        for word in transcript.words:
            written += len(word.text)
            if written > keep + 1:
                break
            kept_words.append(word)
        return _transcript(transcript.text[:keep], transcript.language, tuple(kept_words))

    def _encoder_frames(self, window: AudioWindow) -> int | None:
        content = len(window.samples) // (SAMPLE_RATE // _FRAMES_PER_SECOND)
        return _encoder_size(content, self._final_frames if window.final else self._partial_frames)

    def _quick_beam(self, window: AudioWindow) -> int:
        """The beam of a quick decode: greedy for partials; for finals while the server is behind, a small
        beam, which keeps most of the full beam's WER for a fraction of its cost (greedy finals under load
        cost WER)."""
        return self._busy_beam_size if window.final else 1

    @staticmethod
    def _is_quick(window: AudioWindow) -> bool:
        """One pass without fallback or word timing. (Translation goes alone: ``_transcribe_one`` checks
        the model.)"""
        return (
            (not window.final or window.fast)
            and not window.word_timestamps
            and not window.temperature
            and window.task == "transcribe"
        )

    def _tokenizer(self, window: AudioWindow) -> Tokenizer:
        language = window.language if self.languages != {"en"} else "en"
        key = (window.task, language)
        if key not in self._tokenizers:
            multilingual = self.languages != {"en"}
            self._tokenizers[key] = Tokenizer(self._model.hf_tokenizer, multilingual, window.task, language)
        return self._tokenizers[key]

    def _context_and_bound(self, window: AudioWindow, tokenizer: Tokenizer) -> tuple[list[int], int]:
        """The prompt's context tokens and the number of tokens to generate, bounded by the window's length
        and together within Whisper's 448-token ceiling (older context goes first)."""
        wanted = _max_new_tokens(window)
        context = tokenizer.encode(" " + window.prompt.strip()) if window.prompt else []
        context = context[-(self._model.max_length // 2 - 1) :]  # as much as faster-whisper itself keeps
        while True:
            prompt = self._prompt(window, tokenizer, context)
            room = self._model.max_length - len(prompt)
            if room >= wanted or not context:
                return context, max(1, min(wanted, room))
            context = context[wanted - room :]

    def _prompt(self, window: AudioWindow, tokenizer: Tokenizer, context: list[int]) -> list[int]:
        prompt: list[int] = self._model.get_prompt(
            tokenizer,
            context,
            without_timestamps=not window.word_timestamps,
            prefix=window.prefix,
            hotwords=window.hotwords,
        )
        return prompt

    def _transcribe_together(
        self, windows: Sequence[AudioWindow], frames: int, beam: int
    ) -> list[Transcript]:
        """One decode of several windows, built from faster-whisper's own pieces, as its
        ``BatchedInferencePipeline`` does for the chunks of one file (which shares one prompt)."""
        # As in WhisperModel.transcribe: the extractor's last frame (from its own padding) is left out.
        mels = [self._model.feature_extractor(window.samples)[:, :-1][:, :frames] for window in windows]
        features = np.zeros((len(mels), mels[0].shape[0], frames), dtype=np.float32)  # zero = padding
        for row, mel in zip(features, mels, strict=True):
            row[:, : mel.shape[1]] = mel
        tokenizers = [self._tokenizer(window) for window in windows]
        bounds = [self._context_and_bound(w, t) for w, t in zip(windows, tokenizers, strict=True)]
        prompts = [
            self._prompt(window, tokenizer, context)
            for window, tokenizer, (context, _) in zip(windows, tokenizers, bounds, strict=True)
        ]
        prompts = _aligned_prompts(prompts, tokenizers[0].sot)
        max_length = max(len(prompt) + bound for prompt, (_, bound) in zip(prompts, bounds, strict=True))
        results = self._model.model.generate(
            self._model.encode(features),
            prompts,
            beam_size=beam,
            max_length=min(max_length, self._model.max_length),
            suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizers[0], [-1]),
        )
        return [
            _transcript(tokenizer.decode(result.sequences_ids[0]), tokenizer.language_code, ())
            for result, tokenizer in zip(results, tokenizers, strict=True)
        ]

    @staticmethod
    def _temperature(window: AudioWindow, thorough: bool) -> float | tuple[float, ...]:
        if window.temperature is not None:
            return window.temperature
        # Finals fall back to sampling when the greedy/beam text looks wrong (repetitions, low confidence).
        return (0.0, 0.2, 0.4, 0.6) if thorough else 0.0

    def _transcribe_one(
        self, window: AudioWindow, no_repeats: bool = False, timed: bool = False
    ) -> Transcript:
        """``no_repeats``: beam search that may not repeat a 3-word phrase; ``timed``: with word timing,
        the text decoded as it would be without."""
        if window.task == "translate" and self.languages == {"en"}:
            raise EngineUnavailable(f"{self.name} is English-only and cannot translate")
        thorough = (window.final and not window.fast) or no_repeats
        beam = self._beam_size if thorough else self._quick_beam(window)
        context, bound = self._context_and_bound(window, self._tokenizer(window))
        # Set before the (lazy) segments are iterated below, in this thread: encode() reads it.
        self._model.sizes.frames = self._final_frames if window.final else self._partial_frames
        segments, info = self._model.transcribe(
            window.samples,
            # Translation too is told the spoken language: with "en" (the protocol's default) Whisper still
            # writes English for foreign speech, and its own per-window detection is unreliable on short
            # utterances (base calls German "yi" and Spanish "it" on the test clips).
            language=window.language if self.languages != {"en"} else "en",
            task=window.task,
            beam_size=beam,
            best_of=self._beam_size if thorough else 1,
            temperature=self._temperature(window, thorough and not no_repeats),
            initial_prompt=context or None,
            prefix=window.prefix or None,
            hotwords=window.hotwords or None,
            condition_on_previous_text=False,
            max_new_tokens=bound,
            no_repeat_ngram_size=3 if no_repeats else 0,
            word_timestamps=window.word_timestamps or timed,
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
        return _transcript("".join(texts), info.language, tuple(words))


def _aligned_prompts(prompts: list[list[int]], sot: int) -> list[list[int]]:
    """CTranslate2 needs <|startoftranscript|> at one position across a batch: each prompt keeps as many
    of its most recent context tokens (after <|startofprev|>) as the shortest context has."""
    context = min(prompt.index(sot) for prompt in prompts)
    kept = max(context - 1, 0)  # context tokens after <|startofprev|>
    return [(prompt[:1] if context else []) + prompt[prompt.index(sot) - kept :] for prompt in prompts]


def _timed_words(transcript: Transcript) -> list[SpokenWord]:
    return [part for word in transcript.words for part in spoken_words(word.text, word.start, word.end)]


def _transcript(text: str, language: str, words: tuple[Word, ...]) -> Transcript:
    text = text.strip()
    if not any(character.isalnum() for character in text):
        text, words = "", ()  # a lone "." or "..." is Whisper's way of hearing nothing
    return Transcript(text=text, language=language, words=words)
