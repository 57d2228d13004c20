"""Tiny NeMo models, built once per test session (about 20 s), with their ONNX and MLX conversions."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engines.tiny_nemo import require


@pytest.fixture(scope="session")
def tiny_nemo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """kind -> model: tdt, ctc, tdt_cache, canary (.nemo files); onnx_tdt, onnx_ctc, mlx_tdt (folders)."""
    require("nemo", "nemo")
    from streamscribe.engines.export import export_mlx, export_onnx
    from tests.engines.tiny_nemo import build_tiny_models

    work = tmp_path_factory.mktemp("tiny_nemo")
    models: dict[str, Path] = dict(build_tiny_models(work))
    for kind in ("tdt", "ctc"):
        models[f"onnx_{kind}"] = export_onnx(models[kind], work / f"onnx_{kind}")
    models["mlx_tdt"] = export_mlx(models["tdt"], work / "mlx_tdt")
    return models
