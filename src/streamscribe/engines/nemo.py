"""NVIDIA NeMo (PyTorch): Parakeet (TDT, RNNT or CTC) with NeMo's own streaming pipeline, and Canary.

NeMo is imported lazily, inside the functions that need it, so the base install does not pay for it
(``pip install 'streamscribe[nemo]'``). NeMo >= 2.4 is required: older releases call ``np.sctypes``,
which NumPy 2 removed, and the streaming pipeline API used here appeared in 2.7.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamscribe.config import NemoSettings
from streamscribe.engines import SAMPLE_RATE
from streamscribe.engines.base import AudioWindow, EngineStream, EngineUnavailable, StreamUpdate, Transcript

log = logging.getLogger(__name__)

CANARY_LANGUAGES = frozenset({"en", "es", "de", "fr"})
_NEMO_LOG_LEVEL = 40  # NeMo prints every config it builds at INFO; keep errors only


def torch_device(device: str) -> str:
    """The torch device for the ``device`` setting: auto is cuda when PyTorch sees a GPU, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _import_nemo_asr() -> Any:
    try:
        import nemo.collections.asr as nemo_asr
    except ImportError as exc:
        raise EngineUnavailable(f"NeMo is not installed ({exc}); pip install 'streamscribe[nemo]'") from None
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(_NEMO_LOG_LEVEL)
    return nemo_asr


def check_model_source(model: str) -> None:
    """Fail fast, before importing NeMo (seconds), when the model cannot be found here."""
    path = Path(model).expanduser()
    if model.endswith(".nemo"):
        if not path.is_file():
            raise EngineUnavailable(f"NeMo model file not found ({path.name})")
        return
    if path.is_dir():
        raise EngineUnavailable(f"{path.name} is a folder; a NeMo model is a single .nemo file")
    if _hub_offline() and not _in_hub_cache(model):
        raise EngineUnavailable(
            f"model {model!r} is not in the local model-hub cache and HF_HUB_OFFLINE is set: "
            "download its .nemo file and configure the file's path"
        )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(model: str) -> bool:
    """Whether ``ASRModel.from_pretrained(model)`` can work offline (names without "/" are NGC's: no)."""
    if "/" not in model:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    cached = try_to_load_from_cache(model, f"{model.split('/')[-1]}.nemo")
    return isinstance(cached, str)


def shown_name(model: str) -> str:
    """How a model is named in errors that reach clients: a file's name, never its folder."""
    return Path(model).name if model.endswith(".nemo") else model


def load_nemo_model(model: str, device: str) -> Any:
    """A NeMo ASR model in eval mode from a .nemo file or (hub reachable) a model name.

    Hub names are fetched only while ``HF_HUB_OFFLINE`` is off: the engine registry turns it on unless the
    environment says otherwise (``hub_offline_by_default``).
    """
    check_model_source(model)
    nemo_asr = _import_nemo_asr()
    try:
        if model.endswith(".nemo"):
            loaded = nemo_asr.models.ASRModel.restore_from(str(Path(model).expanduser()), map_location=device)
        else:
            loaded = nemo_asr.models.ASRModel.from_pretrained(model, map_location=device)
    except Exception as exc:
        log.error("loading NeMo model %s failed: %s: %s", model, type(exc).__name__, exc)
        raise EngineUnavailable(
            f"could not load NeMo model {shown_name(model)!r}: {type(exc).__name__} (see the server log)"
        ) from None
    loaded.eval()
    _disable_dither(loaded)
    return loaded


def _disable_dither(model: Any) -> None:
    """Dither adds random noise to features; without it the same audio always gives the same text."""
    featurizer = getattr(getattr(model, "preprocessor", None), "featurizer", None)
    if featurizer is not None and hasattr(featurizer, "dither"):
        featurizer.dither = 0.0


def _text_of(hypothesis: Any) -> str:
    return str(getattr(hypothesis, "text", hypothesis)).strip()


class NemoAsrEngine:
    """A Parakeet-style NeMo model (EncDecRNNTModel/TDT, EncDecCTCModel, hybrids) decoding whole windows.

    ``transcribe`` is serialised with a lock: NeMo's ``transcribe`` switches the model's modes and
    decoding state while it runs.
    """

    sample_rate = SAMPLE_RATE
    languages = frozenset({"en"})

    def __init__(self, model: Any, name: str = "parakeet-standard") -> None:
        self._model = model
        self.name = name
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str, device: str) -> NemoAsrEngine:
        return cls(load_nemo_model(model, torch_device(device)))

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        if not batch:
            return []
        audio = [np.ascontiguousarray(window.samples, dtype=np.float32) for window in batch]
        with self._lock:
            hypotheses = self._model.transcribe(audio, batch_size=len(audio), verbose=False)
        if isinstance(hypotheses, tuple):  # older RNNT API: (best, all)
            hypotheses = hypotheses[0]
        return [Transcript(_text_of(h), "en") for h in hypotheses]


def pipeline_config(
    model: str, device: str, decoding_type: str, cache_aware: bool, options: NemoSettings
) -> Any:
    """The config ``PipelineBuilder.build_pipeline`` expects: NeMo's streaming pipeline, no ITN, no NMT."""
    from omegaconf import OmegaConf

    if cache_aware:
        streaming: dict[str, Any] = {
            "sample_rate": SAMPLE_RATE,
            "batch_size": options.streams_per_step,
            "num_slots": max(options.max_streams, options.streams_per_step),
            "att_context_size": None,
            "use_cache": True,
            "use_feat_cache": True,
            "chunk_size_in_secs": None,  # the model's own chunk: (right context + 1) encoder frames
            "word_boundary_tolerance": 4,
            "request_type": "frame",
        }
    else:
        streaming = {
            "sample_rate": SAMPLE_RATE,
            "batch_size": options.streams_per_step,
            "stateful": True,  # decoder state is carried from chunk to chunk
            "chunk_size": options.chunk_seconds,
            "left_padding_size": options.left_context_seconds,
            "right_padding_size": options.right_context_seconds,
            "word_boundary_tolerance": 4,
            "request_type": "frame",
            "padding_mode": "right",
        }
    return OmegaConf.create(
        {
            "pipeline_type": "cache_aware" if cache_aware else "buffered",
            "asr_decoding_type": decoding_type,
            "matmul_precision": "high",
            "log_level": _NEMO_LOG_LEVEL,
            "enable_itn": False,
            "enable_nmt": False,
            "asr_output_granularity": "segment",
            "lang": None,
            "cache_dir": None,
            "return_tail_result": False,
            "asr": {
                "model_name": model,
                "device": device,
                "device_id": 0,
                "compute_dtype": "float32",
                "use_amp": False,
                "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}},
            },
            "confidence": {
                "exclude_blank": True,
                "aggregation": "mean",
                "method_cfg": {
                    "name": "entropy",
                    "entropy_type": "tsallis",
                    "alpha": 0.5,
                    "entropy_norm": "exp",
                },
            },
            # Utterances are cut by the server's VAD; NeMo's own end-of-utterance stays a fallback.
            "endpointing": {"stop_history_eou": 800, "residue_tokens_at_end": 2},
            "streaming": streaming,
            "itn": {  # unused with enable_itn false, but the builder reads it
                "batch_size": 32,
                "n_jobs": 1,
                "left_padding_size": 4,
                "whitelist": None,
                "overwrite_cache": False,
                "max_number_of_permutations_per_split": 729,
            },
            "nmt": None,
        }
    )


def _model_kind(model: str) -> tuple[str, bool, list[list[int]]]:
    """("rnnt" or "ctc", cache-aware?, trained attention contexts) from the model's config."""
    from nemo.core.classes.modelPT import ModelPT

    if model.endswith(".nemo"):
        config = ModelPT.restore_from(str(Path(model).expanduser()), return_config=True)
    else:
        loaded = load_nemo_model(model, "cpu")  # a hub name: the cache holds it after the first load
        config = loaded.cfg
    target = str(config.get("target", ""))
    decoding_type = "ctc" if "CTC" in target and "RNNT" not in target else "rnnt"
    encoder = config.get("encoder", {})
    cache_aware = str(encoder.get("att_context_style", "regular")) == "chunked_limited"
    contexts = encoder.get("att_context_size", [-1, -1])
    if contexts and not isinstance(contexts[0], int):
        return decoding_type, cache_aware, [list(c) for c in contexts]
    return decoding_type, cache_aware, [list(contexts)]


class NemoStream:
    """One stream in NeMo's pipeline: its id there, and where it is in NeMo's first/last framing."""

    def __init__(self, stream_id: int, abandoned: list[NemoStream]) -> None:
        self.stream_id = stream_id
        self.started = False  # its first frame went to the pipeline
        self.ended = False  # its last frame went: the pipeline holds no state for it
        self.finishing = False
        self.closed = False
        self._abandoned = abandoned

    def finish(self) -> None:
        self.finishing = True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._abandoned.append(self)  # one append: atomic, so safe from the event loop's thread


class NemoStreamingEngine(NemoAsrEngine):
    """Parakeet through NeMo's streaming pipeline (``nemo.collections.asr.inference``).

    Offline-trained models (Parakeet TDT 0.6B) use ``BufferedRNNTPipeline``/``BufferedCTCPipeline``: each
    chunk is encoded with left and right context and the decoder state is carried. Cache-aware models use
    ``CacheAwareRNNTPipeline``/``CacheAwareCTCPipeline``. One ``transcribe_step`` serves many streams.
    ``transcribe`` (whole windows) uses the same loaded model.
    """

    def __init__(self, pipeline: Any, streams_per_step: int, kind: str) -> None:
        super().__init__(pipeline.asr_model.asr_model)
        self._pipeline = pipeline
        self._streams_per_step = streams_per_step
        self.kind = kind
        chunk = (
            pipeline.chunk_size_in_secs if hasattr(pipeline, "chunk_size_in_secs") else pipeline.chunk_size
        )
        self._chunk_samples = round(float(chunk) * SAMPLE_RATE)
        self._stream_ids = itertools.count()
        self._abandoned: list[
            NemoStream
        ] = []  # closed by their owner; freed in the pipeline at the next step
        pipeline.open_session()

    @classmethod
    def load_streaming(cls, model: str, device: str, options: NemoSettings) -> NemoStreamingEngine:
        check_model_source(model)
        _import_nemo_asr()
        from nemo.collections.asr.inference.factory.pipeline_builder import PipelineBuilder

        try:
            decoding_type, cache_aware, contexts = _model_kind(model)
            config = pipeline_config(model, torch_device(device), decoding_type, cache_aware, options)
            right = options.cache_aware_right_context
            if cache_aware and right is not None:
                trained = [c for c in contexts if c[1] == right]
                if not trained:
                    raise EngineUnavailable(
                        f"cache_aware_right_context={right} is not one the model was trained with: {contexts}"
                    )
                config.streaming.att_context_size = trained[0]
            pipeline = PipelineBuilder.build_pipeline(config)
        except EngineUnavailable:
            raise
        except Exception as exc:
            log.error(
                "building the NeMo streaming pipeline for %s failed: %s: %s", model, type(exc).__name__, exc
            )
            raise EngineUnavailable(
                f"could not build NeMo streaming pipeline for {shown_name(model)!r}: {type(exc).__name__} "
                "(details in the server log)"
            ) from None
        _disable_dither(pipeline.asr_model.asr_model)
        kind = f"{'cache-aware' if cache_aware else 'buffered'} {decoding_type}"
        log.info("NeMo streaming pipeline %s (%s) ready for %s", type(pipeline).__name__, kind, model)
        return cls(pipeline, options.streams_per_step, kind)

    @property
    def chunk_samples(self) -> int:
        return self._chunk_samples

    def open_stream(self, language: str) -> NemoStream:
        return NemoStream(next(self._stream_ids), self._abandoned)

    def stream_step(self, pieces: Sequence[tuple[EngineStream, np.ndarray]]) -> list[StreamUpdate]:
        import torch
        from nemo.collections.asr.inference.streaming.framing.request import Frame
        from nemo.collections.asr.inference.streaming.framing.request_options import ASRRequestOptions

        def frame(stream: NemoStream, samples: np.ndarray, last: bool) -> Any:
            audio = torch.from_numpy(np.ascontiguousarray(samples[: self._chunk_samples], np.float32))
            valid = max(1, int(audio.shape[0]))  # a stream cannot end on nothing: one sample of silence
            audio = torch.nn.functional.pad(audio, (0, self._chunk_samples - int(audio.shape[0])))
            first = not stream.started
            stream.started, stream.ended = True, last
            options = ASRRequestOptions() if first else None
            return Frame(
                samples=audio,
                stream_id=stream.stream_id,
                is_first=first,
                is_last=last,
                length=valid,
                options=options,
            )

        updates = [StreamUpdate("", "") for _ in pieces]
        with self._lock:
            # (frame, index of its piece, or None for the closing frame of an abandoned stream)
            frames: list[tuple[Any, int | None]] = []
            while self._abandoned:
                stream = self._abandoned.pop()
                if stream.started and not stream.ended:
                    frames.append((frame(stream, np.zeros(0, np.float32), True), None))
            for index, (handle, samples) in enumerate(pieces):
                assert isinstance(handle, NemoStream)
                if not handle.closed and not handle.ended:
                    frames.append((frame(handle, samples, handle.finishing), index))
            for start in range(0, len(frames), self._streams_per_step):
                batch = frames[start : start + self._streams_per_step]
                with torch.inference_mode():
                    outputs = self._pipeline.transcribe_step([f for f, _ in batch])
                for (_, piece), out in zip(batch, outputs, strict=True):
                    if piece is not None:
                        final, partial = out.final_transcript.strip(), out.partial_transcript.strip()
                        updates[piece] = StreamUpdate(final, partial)
        return updates


class CanaryEngine:
    """Canary (``EncDecMultiTaskModel``): en/es/de/fr speech to text in that language, or translated to
    English, with punctuation and capitals. NeMo has no true streaming for it: sessions re-decode windows."""

    sample_rate = SAMPLE_RATE

    def __init__(self, model: Any, name: str = "canary-1b") -> None:
        self._model = model
        self.name = name
        self._lock = threading.Lock()
        tokenizer_languages = set(getattr(model.tokenizer, "langs", ()) or ())
        self.languages = frozenset(CANARY_LANGUAGES & tokenizer_languages) or frozenset({"en"})

    @classmethod
    def load(cls, model: str, device: str) -> CanaryEngine:
        loaded = load_nemo_model(model, torch_device(device))
        if type(loaded).__name__ != "EncDecMultiTaskModel":
            raise EngineUnavailable(
                f"{shown_name(model)!r} is a {type(loaded).__name__}, not a Canary EncDecMultiTaskModel"
            )
        return cls(loaded)

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        results: list[Transcript] = []
        # One call per (language, task): Canary's prompt is per call.
        with self._lock:
            for window in batch:
                target = "en" if window.task == "translate" else window.language
                hypotheses = self._model.transcribe(
                    [np.ascontiguousarray(window.samples, dtype=np.float32)],
                    batch_size=1,
                    verbose=False,
                    source_lang=window.language,
                    target_lang=target,
                    task="ast" if window.task == "translate" else "asr",
                    pnc="yes",
                )
                results.append(Transcript(_text_of(hypotheses[0]), target))
        return results
