"""Parakeet exported to ONNX, run by onnx-asr on onnxruntime (CPU, or CUDA when its provider is present).

onnx-asr is imported lazily (``pip install 'streamscribe[onnx]'``). The model is a local folder in
onnx-asr's layout; ``streamscribe.engines.export`` writes one from a ``.nemo`` file.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamscribe.engines import SAMPLE_RATE
from streamscribe.engines.base import AudioWindow, EngineUnavailable, Transcript

log = logging.getLogger(__name__)

_TRANSDUCER_FILES = ("encoder-model.onnx", "decoder_joint-model.onnx")


def onnx_model_type(folder: Path) -> str:
    """onnx-asr's model type for a folder: from its config.json, else guessed from the file names."""
    if not (folder / "vocab.txt").is_file():
        raise EngineUnavailable(f"ONNX folder {folder.name} has no vocab.txt (see docs/engines.md)")
    config = folder / "config.json"
    if config.is_file():
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type in ("nemo-conformer-tdt", "nemo-conformer-rnnt", "nemo-conformer-ctc"):
            return str(model_type)
    if all((folder / name).is_file() for name in _TRANSDUCER_FILES):
        return "nemo-conformer-tdt"
    if (folder / "model.onnx").is_file():
        return "nemo-conformer-ctc"
    raise EngineUnavailable(
        f"ONNX folder {folder.name} holds neither {' + '.join(_TRANSDUCER_FILES)} (TDT/RNNT) "
        "nor model.onnx (CTC)"
    )


def onnx_providers(device: str) -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise EngineUnavailable("device=cuda but onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    return ["CPUExecutionProvider"]


class OnnxParakeetEngine:
    """A Parakeet TDT/RNNT/CTC model exported to ONNX; decodes whole windows."""

    name = "parakeet-onnx"
    sample_rate = SAMPLE_RATE
    languages = frozenset({"en"})

    def __init__(self, folder: Path, device: str = "cpu", cpu_threads: int = 0) -> None:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise EngineUnavailable(f"ONNX model folder not found ({folder.name})")
        model_type = onnx_model_type(folder)
        try:
            import onnx_asr
            import onnxruntime
        except ImportError as exc:
            raise EngineUnavailable(
                f"onnx-asr is not installed ({exc}); pip install 'streamscribe[onnx]'"
            ) from None
        options = onnxruntime.SessionOptions()
        if cpu_threads:
            options.intra_op_num_threads = cpu_threads
        try:
            # The type goes first and the folder second: a folder given alone is taken as a hub repo id.
            self._model: Any = onnx_asr.load_model(
                model_type, folder, sess_options=options, providers=onnx_providers(device)
            )
        except EngineUnavailable:
            raise
        except Exception as exc:
            log.error("loading the %s model in %s failed: %s: %s", "ONNX", folder, type(exc).__name__, exc)
            raise EngineUnavailable(
                f"could not load ONNX model from {folder.name}: {type(exc).__name__} (see the server log)"
            ) from None
        self.model_type = model_type
        self._lock = threading.Lock()

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        if not batch:
            return []
        audio = [np.ascontiguousarray(window.samples, dtype=np.float32) for window in batch]
        with self._lock:
            texts = self._model.recognize(audio, sample_rate=SAMPLE_RATE)
        return [Transcript(str(text).strip(), "en") for text in texts]
