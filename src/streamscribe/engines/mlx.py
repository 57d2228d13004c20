"""Parakeet on Apple's MLX through parakeet-mlx (Apple silicon GPU; ``mlx[cpu]`` runs it on Linux too).

parakeet-mlx is imported lazily (``pip install 'streamscribe[mlx]'``). The model is a local folder with
``config.json`` (the NeMo model config) and ``model.safetensors``, as published for parakeet-mlx or
written from a ``.nemo`` file by ``streamscribe.engines.export``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from streamscribe.engines import SAMPLE_RATE
from streamscribe.engines.base import AudioWindow, EngineUnavailable, Transcript

log = logging.getLogger(__name__)


class MlxParakeetEngine:
    """A Parakeet TDT/RNNT/CTC model on MLX; decodes whole windows (MLX runs one at a time)."""

    name = "parakeet-mlx"
    sample_rate = SAMPLE_RATE
    languages = frozenset({"en"})

    def __init__(self, folder: Path) -> None:
        # Absolute: from_pretrained asks the model hub first, and an absolute path is never a hub name, so
        # it goes straight to the folder instead of waiting for the network.
        folder = Path(folder).expanduser().resolve()
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise EngineUnavailable(f"MLX model folder {folder.name} has no {name}")
        try:
            import mlx.core as mx
            from parakeet_mlx.audio import get_logmel
            from parakeet_mlx.utils import from_pretrained
        except ImportError as exc:
            raise EngineUnavailable(
                f"parakeet-mlx cannot be imported ({exc}); pip install 'streamscribe[mlx]' "
                "(on Linux MLX needs mlx[cpu])"
            ) from None
        # MLX streams belong to the thread that made them: load and decode on one thread of our own.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        try:
            self._model: Any = self._thread.submit(from_pretrained, str(folder), dtype=mx.float32).result()
        except Exception as exc:
            log.error("loading the %s model in %s failed: %s: %s", "MLX", folder, type(exc).__name__, exc)
            raise EngineUnavailable(
                f"could not load MLX model from {folder.name}: {type(exc).__name__} (see the server log)"
            ) from None
        self._mx = mx
        self._get_logmel = get_logmel

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        return self._thread.submit(self._transcribe_here, batch).result()

    def _transcribe_here(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        results: list[Transcript] = []
        for window in batch:
            samples = self._mx.array(np.ascontiguousarray(window.samples, dtype=np.float32))
            mel = self._get_logmel(samples, self._model.preprocessor_config)
            result = self._model.generate(mel)[0]
            results.append(Transcript(str(result.text).strip(), "en"))
        return results
