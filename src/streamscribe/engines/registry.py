"""Model name + variant + language -> a loaded engine (or the fallback, and why); which engines this
machine can run, and why not."""

from __future__ import annotations

import logging
import os
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamscribe.config import ENV_PREFIX, Settings
from streamscribe.engines.base import (
    AudioWindow,
    Engine,
    EngineUnavailable,
    StreamingEngine,
    UnsupportedLanguage,
)
from streamscribe.engines.bundled import BUNDLED_WHISPER_MODELS

log = logging.getLogger(__name__)

# 1.7 s of English speech (the start of tests/data/short.wav), 16 kHz 16-bit mono.
WARM_UP_CLIP = Path(__file__).with_name("warm_up.wav")

NEMO_LANGUAGES = {"parakeet": ("en",), "canary": ("en", "es", "de", "fr")}
NEMO_VARIANTS = {"parakeet": ("standard", "onnx", "mlx"), "canary": ("standard",)}
FALLBACK_MODEL = "whisper"  # bundled, so it can always run
MOONSHINE_ENGINE = "moonshine-base-en"

# The names a client may send besides whisper-<name> (see ``resolve_model``): a model (with the variant
# asked for), model-variant as ``streamscribe models`` lists them, and Canary's engine name.
MODEL_ALIASES: dict[str, tuple[str, str | None]] = {
    "whisper": ("whisper", None),
    **{model: (model, None) for model in NEMO_VARIANTS},
    **{f"{model}-{variant}": (model, variant) for model in NEMO_VARIANTS for variant in NEMO_VARIANTS[model]},
    "canary-1b": ("canary", None),
    "moonshine": ("moonshine", "standard"),
    "moonshine-standard": ("moonshine", "standard"),
    MOONSHINE_ENGINE: ("moonshine", "standard"),
}


class UnknownModel(ValueError):
    """A model name this server does not know: the client's mistake, unlike an unavailable engine."""


def resolve_model(name: str, variant: str = "standard") -> tuple[str, str]:
    """(model, variant) for a name a client sends, any case; an alias's own variant wins over ``variant``.
    Any ``whisper-<name>`` (OpenAI's ``whisper-1``, an engine's ``whisper-tiny.en``) is this server's
    Whisper, whose model the language picks (``EngineRegistry.whisper_model_for``). Raises UnknownModel."""
    key = name.strip().lower()
    if key in MODEL_ALIASES:
        model, own_variant = MODEL_ALIASES[key]
        return model, own_variant or variant
    if key.startswith("whisper-"):
        return "whisper", "standard"
    known = ", ".join(MODEL_ALIASES)
    raise UnknownModel(f"unknown model {name!r}; expected one of {known} or whisper-<name> (e.g. whisper-1)")


@dataclass(frozen=True)
class EngineChoice:
    """The engine that answers a request.

    Attributes:
        engine: The loaded engine.
        fallback_reason: Why it is not the requested one (which is unavailable here); None when it is.
    """

    engine: Engine
    fallback_reason: str | None = None


@dataclass(frozen=True)
class EngineStatus:
    """Whether one model/variant can run here.

    Attributes:
        model: "whisper", "parakeet", "canary" or "moonshine".
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


def hub_offline_by_default() -> None:
    """Models load from local files unless ``HF_HUB_OFFLINE=0`` lets NeMo fetch hub names: a server must
    not stall on the network, nor reach it unasked. Called before anything imports huggingface_hub,
    which reads the variable once, at import."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def resolve_device(device: str) -> str:
    """ "auto" becomes "cuda" when CTranslate2 sees a GPU, else "cpu"."""
    if device != "auto":
        return device
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


class EngineRegistry:
    """Loads each engine once per process and hands the same instance to every session."""

    def __init__(self, settings: Settings) -> None:
        hub_offline_by_default()
        self._settings = settings
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()  # guards _load_locks
        self._load_locks: dict[str, threading.Lock] = {}

    def whisper_model_for(self, language: str, task: str = "transcribe") -> str:
        """English transcription gets the (faster) English model; other languages and every translation
        get the multilingual one, since English-only Whisper models cannot translate."""
        whisper = self._settings.whisper
        if language == "en" and task == "transcribe":
            return whisper.english_model
        return whisper.multilingual_model

    def get(self, model: str, variant: str, language: str, task: str = "transcribe") -> Engine:
        """The engine for this choice, loading it on first use. Raises EngineUnavailable."""
        if model == "whisper":
            engine = self._whisper(self.whisper_model_for(language, task))
        elif model == "moonshine":
            problem = (
                self._moonshine_problem() if variant == "standard" else f"moonshine has no {variant} variant"
            )
            if problem:
                raise EngineUnavailable(problem)
            engine = self.load_once("moonshine:standard", self._load_moonshine)
        else:
            status = next((s for s in self.status() if s.model == model and s.variant == variant), None)
            if status is None:
                raise EngineUnavailable(f"{model} has no {variant} variant")
            if not status.available:
                raise EngineUnavailable(status.reason or f"{model} ({variant}) is not available")
            engine = self._nemo_family(model, variant)
        if language not in engine.languages:
            raise UnsupportedLanguage(f"{engine.name} does not transcribe language {language!r}")
        if task == "translate" and engine.languages == {"en"}:
            raise EngineUnavailable(f"{engine.name} is English-only and cannot translate")
        return engine

    def choose_engine(
        self, model: str, variant: str, language: str, task: str = "transcribe"
    ) -> EngineChoice:
        """The engine for a resolved (model, variant), loading it on first use; when it is unavailable
        here and ``allow_fallback`` is on, Whisper instead, with the reason. Raises UnsupportedLanguage
        when no engine that may answer knows the language, else EngineUnavailable."""
        try:
            return EngineChoice(self.get(model, variant, language, task))
        except EngineUnavailable as exc:
            if model == FALLBACK_MODEL or not self._settings.allow_fallback:
                if isinstance(exc, UnsupportedLanguage):
                    raise
                raise EngineUnavailable(f"{model} ({variant}) is unavailable: {exc}") from None
            reason = exc
        try:
            engine = self.get(FALLBACK_MODEL, "standard", language, task)
        except EngineUnavailable as exc:  # kept an UnsupportedLanguage when it is one: no engine knows it
            problem = f"{model} ({variant}) is unavailable ({reason}) and so is the fallback: {exc}"
            raise type(exc)(problem) from None
        return EngineChoice(
            engine, f"{model} ({variant}) is unavailable here ({reason}); using {engine.name}"
        )

    def loaded(self) -> list[Engine]:
        return list(self._engines.values())

    def _whisper(self, model: str) -> Engine:
        def load() -> Engine:
            from streamscribe.engines.whisper import WhisperEngine

            settings = self._settings
            device = resolve_device(settings.device)
            return WhisperEngine(
                model,
                cache_dir=settings.cache_dir,
                device=device,
                compute_type=settings.whisper.compute_type if device == "cpu" else "float16",
                cpu_threads=settings.cpu_threads,
                workers=settings.decode_worker_count,
                beam_size=settings.whisper.beam_size,
                busy_beam_size=settings.whisper.busy_beam_size,
                min_encoder_seconds=settings.whisper.min_encoder_seconds,
                partial_encoder_seconds=settings.whisper.partial_encoder_seconds,
            )

        return self.load_once(f"whisper:{model}", load)

    def _nemo_family(self, model: str, variant: str) -> Engine:
        """Parakeet (standard, onnx, mlx) or Canary, loaded once."""
        return self.load_once(f"{model}:{variant}", lambda: self._load_nemo_family(model, variant))

    def load_once(self, key: str, load: Callable[[], Engine]) -> Engine:
        """The engine under ``key``, loaded and warmed up on first use. A load (seconds) holds only its own
        key's lock: streams for engines already loaded, or loading, never wait behind another's load."""
        engine = self._engines.get(key)
        if engine is not None:
            return engine
        with self._lock:
            key_lock = self._load_locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in self._engines:
                self._engines[key] = warm_up(load())
            return self._engines[key]

    def _load_moonshine(self) -> Engine:
        from streamscribe.engines.moonshine import MoonshineEngine

        settings = self._settings
        return MoonshineEngine(settings.cache_dir, resolve_device(settings.device), settings.cpu_threads)

    def _load_nemo_family(self, model: str, variant: str) -> Engine:
        nemo = self._settings.nemo
        device = self._settings.device
        if model == "canary":
            from streamscribe.engines.nemo import CanaryEngine

            assert nemo.canary_model is not None
            return CanaryEngine.load(nemo.canary_model, device)
        if variant == "onnx":
            from streamscribe.engines.onnx import OnnxParakeetEngine

            assert nemo.parakeet_onnx_dir is not None
            return OnnxParakeetEngine(nemo.parakeet_onnx_dir, device, self._settings.cpu_threads)
        if variant == "mlx":
            from streamscribe.engines.mlx import MlxParakeetEngine

            assert nemo.parakeet_mlx_dir is not None
            return MlxParakeetEngine(nemo.parakeet_mlx_dir)
        from streamscribe.engines.nemo import NemoAsrEngine, NemoStreamingEngine

        assert nemo.parakeet_model is not None
        if not nemo.native_streaming:
            return NemoAsrEngine.load(nemo.parakeet_model, device)
        return NemoStreamingEngine.load_streaming(nemo.parakeet_model, device, nemo)

    def status(self) -> list[EngineStatus]:
        """Every engine, variant and language this server knows, with availability."""
        rows = [self._whisper_status()]
        for model, variants in NEMO_VARIANTS.items():
            for variant in variants:
                problem = self._nemo_family_problem(model, variant)
                languages = NEMO_LANGUAGES[model]
                loaded = self._engines.get(f"{model}:{variant}")
                if loaded is not None:
                    languages = tuple(sorted(loaded.languages, key=lambda code: (code != "en", code)))
                available = problem is None
                rows.append(EngineStatus(model, variant, languages, available=available, reason=problem))
        problem = self._moonshine_problem()
        rows.append(EngineStatus("moonshine", "standard", ("en",), available=problem is None, reason=problem))
        return rows

    @staticmethod
    def _moonshine_problem() -> str | None:
        """Why Moonshine cannot load here (a package, the shipped files), or None. Imports nothing."""
        from streamscribe.engines.moonshine import MOONSHINE_PACKAGES, shipped_model_dir

        for package in MOONSHINE_PACKAGES:
            try:
                _require_distribution(package)
            except EngineUnavailable:
                return f"package {package} is not installed (pip install 'streamscribe[moonshine]')"
        try:
            shipped_model_dir()
        except EngineUnavailable as exc:
            return str(exc)
        return None

    def _nemo_family_problem(self, model: str, variant: str) -> str | None:
        """Why a NeMo-family engine cannot load here (package, then weights), or None. Imports nothing."""
        nemo = self._settings.nemo
        setting: str | Path | None
        if variant == "standard":
            packages, extra = ("nemo_toolkit", "torch"), "nemo"
            name = "canary_model" if model == "canary" else "parakeet_model"
            setting = nemo.canary_model if model == "canary" else nemo.parakeet_model
        elif variant == "onnx":
            packages, extra = ("onnx-asr", "onnxruntime"), "onnx"
            name, setting = "parakeet_onnx_dir", nemo.parakeet_onnx_dir
        else:
            packages, extra = ("parakeet-mlx", "mlx"), "mlx"
            name, setting = "parakeet_mlx_dir", nemo.parakeet_mlx_dir
        for package in packages:
            try:
                _require_distribution(package)
            except EngineUnavailable:
                return f"package {package} is not installed (pip install 'streamscribe[{extra}]')"
        variable = f"{ENV_PREFIX}NEMO__{name.upper()}"
        if setting is None:
            return f"no weights configured: set {variable}"
        text = str(setting)
        path = Path(text).expanduser()
        if variant == "standard":
            # Only the file's name: this reason reaches clients, which must not learn server paths.
            if text.endswith(".nemo") and not path.is_file():
                return f"{variable} points at a missing file ({path.name})"
            from streamscribe.engines.nemo import check_model_source

            try:
                check_model_source(text)
            except EngineUnavailable as exc:
                return f"{variable}: {exc}"
            return None
        if not path.is_dir():
            return f"{variable} points at a missing folder ({path.name})"
        return None

    def _whisper_status(self) -> EngineStatus:
        from streamscribe.engines.whisper import whisper_model_problem

        languages: set[str] = set()
        problems: list[str] = []
        whisper = self._settings.whisper
        for setting, model in {
            "english_model": whisper.english_model,
            "multilingual_model": whisper.multilingual_model,
        }.items():
            bundled = BUNDLED_WHISPER_MODELS.get(model)
            if bundled is None:
                problem = whisper_model_problem(model, self._settings.cache_dir)
                if problem:
                    problems.append(f"{ENV_PREFIX}WHISPER__{setting.upper()}: {problem}")
                languages.add("en" if model.endswith(".en") else "multilingual")
                continue
            try:
                for package in bundled.packages:
                    _require_distribution(package)
                languages.add("en" if bundled.english_only else "multilingual")
            except EngineUnavailable as exc:
                problems.append(str(exc))
        shown = ("en",) if languages == {"en"} else ("en", "es", "de", "fr", "...")
        return EngineStatus(
            "whisper", "standard", shown, available=not problems, reason="; ".join(problems) or None
        )


def warm_up_clip(rate: int) -> np.ndarray:
    """The shipped speech clip as float32 samples at ``rate``."""
    with wave.open(str(WARM_UP_CLIP)) as clip:
        samples = np.frombuffer(clip.readframes(clip.getnframes()), dtype="<i2").astype(np.float32) / 32768
        clip_rate = clip.getframerate()
    if rate != clip_rate:
        import soxr

        samples = soxr.resample(samples, clip_rate, rate).astype(np.float32)
    return samples


def warm_up(engine: Engine) -> Engine:
    """Decode real speech once, at load time, so that the first stream does not pay the engine's one-time
    costs: MLX compiles its CPU kernels on first use (seconds on a new machine); the others have smaller
    first-call costs. Real speech, not silence: a stream's silence never reaches the engine (the VAD
    drops it), and speech runs the decoder as live streams will. Returns the engine; raises
    EngineUnavailable when it cannot decode.
    """
    started = time.monotonic()
    samples = warm_up_clip(engine.sample_rate)
    language = "en" if "en" in engine.languages else min(engine.languages)
    try:
        # A partial (greedy) and a final (beam search): the two ways sessions decode windows.
        engine.transcribe([AudioWindow(samples, language, final=False), AudioWindow(samples, language)])
        if isinstance(engine, StreamingEngine):
            stream, size = engine.open_stream(language), engine.chunk_samples
            for start in range(0, len(samples), size):
                if start + size >= len(samples):
                    stream.finish()
                engine.stream_step([(stream, samples[start : start + size])])
    except Exception as exc:
        log.error("warming up %s failed: %s: %s", engine.name, type(exc).__name__, exc)
        raise EngineUnavailable(
            f"{engine.name} failed to decode its warm-up clip: {type(exc).__name__} (see the server log)"
        ) from None
    seconds = time.monotonic() - started
    log.info(
        "warmed up %s in %.2f s",
        engine.name,
        seconds,
        extra={"event": "engine_warm_up", "engine": engine.name, "seconds": round(seconds, 3)},
    )
    return engine


def _require_distribution(name: str) -> None:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(name)
    except PackageNotFoundError:
        raise EngineUnavailable(f"package {name} is not installed (pip install {name})") from None
