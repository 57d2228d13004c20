"""Model name + variant + language -> a loaded engine; which engines this machine can run, and why not."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from streamscribe.config import Settings
from streamscribe.engines.base import Engine, EngineUnavailable, UnsupportedLanguage
from streamscribe.engines.bundled import BUNDLED_WHISPER_MODELS

log = logging.getLogger(__name__)

NEMO_LANGUAGES = {"parakeet": ("en",), "canary": ("en", "es", "de", "fr")}
NEMO_VARIANTS = {"parakeet": ("standard", "onnx", "mlx"), "canary": ("standard",)}


@dataclass(frozen=True)
class EngineStatus:
    """Whether one model/variant can run here.

    Attributes:
        model: "whisper", "parakeet" or "canary".
        variant: "standard", "onnx" or "mlx".
        languages: Languages it transcribes.
        available: True when it can be loaded on this machine.
        reason: Why not, when unavailable.
    """

    model: str
    variant: str
    languages: tuple[str, ...]
    available: bool
    reason: str | None = None


def resolve_device(device: str) -> str:
    """ "auto" becomes "cuda" when CTranslate2 sees a GPU, else "cpu"."""
    if device != "auto":
        return device
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


class EngineRegistry:
    """Loads each engine once per process and hands the same instance to every session."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def whisper_model_for(self, language: str, task: str = "transcribe") -> str:
        """English transcription gets the (faster) English model; other languages and every translation
        get the multilingual one, since English-only Whisper models cannot translate."""
        whisper = self._settings.whisper
        if language == "en" and task == "transcribe":
            return whisper.english_model
        return whisper.multilingual_model

    def get(self, model: str, variant: str, language: str, task: str = "transcribe") -> Engine:
        """The engine for this choice, loading it on first use. Raises EngineUnavailable."""
        if model != "whisper":
            status = next(s for s in self.status() if s.model == model and s.variant == variant)
            raise EngineUnavailable(status.reason or f"{model} ({variant}) is not available")
        engine = self._whisper(self.whisper_model_for(language, task))
        if language not in engine.languages:
            raise UnsupportedLanguage(f"{engine.name} does not transcribe language {language!r}")
        if task == "translate" and engine.languages == {"en"}:
            raise EngineUnavailable(f"{engine.name} is English-only and cannot translate")
        return engine

    def loaded(self) -> list[Engine]:
        return list(self._engines.values())

    def _whisper(self, model: str) -> Engine:
        key = f"whisper:{model}"
        with self._lock:
            if key not in self._engines:
                from streamscribe.engines.whisper import WhisperEngine

                settings = self._settings
                device = resolve_device(settings.device)
                self._engines[key] = WhisperEngine(
                    model,
                    cache_dir=settings.cache_dir,
                    device=device,
                    compute_type=settings.whisper.compute_type if device == "cpu" else "float16",
                    cpu_threads=settings.cpu_threads,
                    workers=settings.decode_workers,
                    beam_size=settings.whisper.beam_size,
                    min_encoder_seconds=settings.whisper.min_encoder_seconds,
                )
            return self._engines[key]

    def status(self) -> list[EngineStatus]:
        """Every engine, variant and language this server knows, with availability."""
        rows = [self._whisper_status()]
        for model, variants in NEMO_VARIANTS.items():
            for variant in variants:
                rows.append(
                    EngineStatus(
                        model,
                        variant,
                        NEMO_LANGUAGES[model],
                        available=False,
                        reason=f"the {model} {variant} engine is not part of this build yet",
                    )
                )
        return rows

    def _whisper_status(self) -> EngineStatus:
        languages: set[str] = set()
        problems: list[str] = []
        for model in {self._settings.whisper.english_model, self._settings.whisper.multilingual_model}:
            bundled = BUNDLED_WHISPER_MODELS.get(model)
            try:
                if bundled is None:
                    from streamscribe.engines.whisper import resolve_model_dir

                    resolve_model_dir(model, self._settings.cache_dir)
                    languages.add("multilingual")
                else:
                    for package in bundled.packages:
                        _require_distribution(package)
                    languages.add("en" if bundled.english_only else "multilingual")
            except EngineUnavailable as exc:
                problems.append(str(exc))
        shown = ("en",) if languages == {"en"} else ("en", "es", "de", "fr", "...")
        return EngineStatus(
            "whisper", "standard", shown, available=not problems, reason="; ".join(problems) or None
        )


def _require_distribution(name: str) -> None:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(name)
    except PackageNotFoundError:
        raise EngineUnavailable(f"package {name} is not installed (pip install {name})") from None
