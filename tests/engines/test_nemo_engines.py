"""Parakeet (standard, onnx, mlx) and Canary on tiny random-weight NeMo models, through the real server.

Random weights make the words meaningless, so these tests assert the protocol, determinism and that
backends agree on the same model, never the words.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from streamscribe.client import StreamResult, stream_audio, stream_url
from streamscribe.config import Settings
from streamscribe.engines.base import AudioWindow
from streamscribe.engines.registry import EngineRegistry
from tests.conftest import TEST_KEY, ServerProcess
from tests.engines.tiny_nemo import SAMPLE_RATE, require

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

# backend id -> (config model, variant, expected `model` field, NeMo settings built from the tiny models)
BACKENDS: dict[str, tuple[str, str, str, Callable[[dict[str, Path]], dict[str, Any]]]] = {
    "parakeet-standard-tdt": (
        "parakeet",
        "standard",
        "parakeet-standard",
        lambda m: {"parakeet_model": m["tdt"]},
    ),
    "parakeet-standard-ctc": (
        "parakeet",
        "standard",
        "parakeet-standard",
        lambda m: {"parakeet_model": m["ctc"]},
    ),
    "parakeet-standard-cache-aware": (
        "parakeet",
        "standard",
        "parakeet-standard",
        lambda m: {"parakeet_model": m["tdt_cache"], "cache_aware_right_context": 1},
    ),
    "parakeet-standard-windows": (
        "parakeet",
        "standard",
        "parakeet-standard",
        lambda m: {"parakeet_model": m["tdt"], "native_streaming": False},
    ),
    "parakeet-onnx": ("parakeet", "onnx", "parakeet-onnx", lambda m: {"parakeet_onnx_dir": m["onnx_tdt"]}),
    "parakeet-mlx": ("parakeet", "mlx", "parakeet-mlx", lambda m: {"parakeet_mlx_dir": m["mlx_tdt"]}),
    "canary-1b": ("canary", "standard", "canary-1b", lambda m: {"canary_model": m["canary"]}),
}
EXTRA_PACKAGES = {"onnx": ("onnx_asr", "onnx"), "mlx": ("parakeet_mlx", "mlx")}


@pytest.fixture(scope="module")
def speech(clip: Callable[[str], np.ndarray]) -> np.ndarray:
    """One spoken sentence with silence after it, so the VAD closes the utterance by itself."""
    return np.concatenate([clip("short.wav"), np.zeros(SAMPLE_RATE, np.float32)])


def nemo_server(make_server: Callable[..., Any], **nemo: Any) -> Any:
    return make_server(preload=False, allow_fallback=False, nemo={k: str(v) for k, v in nemo.items()})


def texts(result: StreamResult, kind: str) -> list[str]:
    return [frame["text"] for frame in result.of_type(kind)]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backend_completes_a_streaming_session(
    backend: str, tiny_nemo: dict[str, Path], make_server: Callable[..., Any], speech: np.ndarray
) -> None:
    model, variant, expected_name, settings = BACKENDS[backend]
    if variant in EXTRA_PACKAGES:
        require(*EXTRA_PACKAGES[variant])
    running = nemo_server(make_server, **settings(tiny_nemo))
    # Load the engine (which warms it up) before streaming: a stream's config would load it, and the audio
    # sent meanwhile would arrive all at once, too late for partials.
    running.app.state.runtime.registry.get(model, variant, "en")

    result = running.stream(
        speech,
        config={"model": model, "variant": variant, "partial_interval": 0.3},
        speed=3.0,
        finish="commit",
    )

    assert result.error is None, result.error
    states = [(f["state"], f.get("model")) for f in result.of_type("status")]
    assert states == [("configured", model), ("ready", expected_name)]
    partials, finals = result.of_type("partial"), result.of_type("final")
    assert partials, "no partial transcript"
    assert finals, "no final transcript"
    for frame in partials + finals:
        assert frame["model"] == expected_name
        assert frame["text"].strip()
    assert [f["segment_id"] for f in finals] == sorted({f["segment_id"] for f in finals})
    assert all(p["segment_id"] <= finals[-1]["segment_id"] for p in partials)
    assert 0 <= finals[0]["start"] < finals[0]["end"] <= len(speech) / SAMPLE_RATE + 0.01
    assert result.full_transcript == " ".join(texts(result, "final"))


def test_first_mlx_stream_on_a_new_machine_has_partials(
    tiny_nemo: dict[str, Path],
    server_process: Callable[..., ServerProcess],
    speech: np.ndarray,
    tmp_path: Path,
) -> None:
    """MLX compiles its CPU kernels on first use (seconds on a cold cache); the engine's load-time warm-up
    pays for that, not the first stream's partials. MLX caches them in the temporary folder
    (``TMPDIR/mlx/<version>/cpu``), so a server with a new TMPDIR sees what a new machine sees."""
    require("parakeet_mlx", "mlx")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    server = server_process(
        TMPDIR=str(temporary),
        STREAMSCRIBE_PRELOAD="false",
        STREAMSCRIBE_ALLOW_FALLBACK="false",
        STREAMSCRIBE_NEMO__PARAKEET_MLX_DIR=str(tiny_nemo["mlx_tdt"]),
    )
    url = stream_url(f"ws://127.0.0.1:{server.port}", TEST_KEY)
    config = {"model": "parakeet", "variant": "mlx"}
    # A stream's config loads the engine; audio sent while it loads would arrive too late for partials.
    loading = asyncio.run(
        stream_audio(url, np.zeros(SAMPLE_RATE // 2, np.float32), SAMPLE_RATE, config=config)
    )
    assert loading.close_code == 1000, loading.error

    result = asyncio.run(
        stream_audio(
            url, speech, SAMPLE_RATE, config={**config, "partial_interval": 0.3}, speed=3.0, finish="commit"
        )
    )

    assert result.error is None, result.error
    assert {f["model"] for f in result.of_type("final")} == {"parakeet-mlx"}
    assert result.of_type("partial"), "no partial transcript"
    assert list(temporary.glob("mlx/*/cpu/*.so")), "MLX did not use the new cache: the test proves nothing"


def test_onnx_mlx_and_nemo_give_the_same_text(
    tiny_nemo: dict[str, Path], clip: Callable[[str], np.ndarray]
) -> None:
    """Engine level, several clips: the exported models decode exactly like NeMo (TDT and CTC)."""
    require("onnx_asr", "onnx")
    require("parakeet_mlx", "mlx")
    from streamscribe.engines.nemo import NemoAsrEngine
    from streamscribe.engines.onnx import OnnxParakeetEngine

    windows = [AudioWindow(clip(name), "en") for name in ("short.wav", "es.wav", "de.wav")]
    for kind in ("tdt", "ctc"):
        nemo_texts = [t.text for t in NemoAsrEngine.load(str(tiny_nemo[kind]), "cpu").transcribe(windows)]
        assert all(nemo_texts), f"tiny {kind} model said nothing: the comparison would be empty"
        assert [
            t.text for t in OnnxParakeetEngine(tiny_nemo[f"onnx_{kind}"]).transcribe(windows)
        ] == nemo_texts
        if kind == "tdt":
            from streamscribe.engines.mlx import MlxParakeetEngine

            assert [t.text for t in MlxParakeetEngine(tiny_nemo["mlx_tdt"]).transcribe(windows)] == nemo_texts


def test_onnx_and_nemo_give_the_same_finals_through_the_server(
    tiny_nemo: dict[str, Path], make_server: Callable[..., Any], speech: np.ndarray
) -> None:
    """Same model, same VAD cuts, same windowed policy: the finals are identical."""
    require("onnx_asr", "onnx")
    nemo = nemo_server(make_server, parakeet_model=tiny_nemo["tdt"], native_streaming=False)
    onnx = nemo_server(make_server, parakeet_onnx_dir=tiny_nemo["onnx_tdt"])
    by_nemo = nemo.stream(speech, config={"model": "parakeet"}, speed=0, finish="stop")
    by_onnx = onnx.stream(speech, config={"model": "parakeet-onnx"}, speed=0, finish="stop")
    assert texts(by_nemo, "final") and texts(by_nemo, "final") == texts(by_onnx, "final")
    assert by_nemo.full_transcript == by_onnx.full_transcript
    assert {f["model"] for f in by_onnx.of_type("final")} == {"parakeet-onnx"}


def test_native_streaming_is_deterministic_with_concurrent_streams(
    tiny_nemo: dict[str, Path], make_server: Callable[..., Any], speech: np.ndarray
) -> None:
    """Three streams at once share NeMo steps; each gets the text a lone stream gets."""
    running = nemo_server(make_server, parakeet_model=tiny_nemo["tdt"])
    config = {"model": "parakeet", "enable_partial": False}
    alone = running.stream(speech, config=config, speed=0, finish="stop")

    async def together() -> list[StreamResult]:
        return list(
            await asyncio.gather(
                *(
                    stream_audio(running.ws_url(), speech, SAMPLE_RATE, config=config, speed=4.0)
                    for _ in range(3)
                )
            )
        )

    assert texts(alone, "final")
    for result in asyncio.run(together()):
        assert texts(result, "final") == texts(alone, "final")


def test_canary_translates_to_english(tiny_nemo: dict[str, Path], clip: Callable[[str], np.ndarray]) -> None:
    from streamscribe.engines.nemo import CanaryEngine

    engine = CanaryEngine.load(str(tiny_nemo["canary"]), "cpu")
    assert engine.languages == {"en", "es", "de", "fr"}
    german = clip("de.wav")
    results = engine.transcribe([AudioWindow(german, "de"), AudioWindow(german, "de", task="translate")])
    assert [r.language for r in results] == ["de", "en"]
    assert engine.transcribe([AudioWindow(german, "de")]) == results[:1]


def test_canary_session_translates_when_asked(
    tiny_nemo: dict[str, Path], make_server: Callable[..., Any], clip: Callable[[str], np.ndarray]
) -> None:
    running = nemo_server(make_server, canary_model=tiny_nemo["canary"])
    german = np.concatenate([clip("de.wav"), np.zeros(SAMPLE_RATE, np.float32)])
    config = {"model": "canary", "language": "de", "enable_partial": False}
    transcribed = running.stream(german, config=config, speed=0)
    translated = running.stream(german, config={**config, "task": "translate"}, speed=0)
    assert {f["language"] for f in transcribed.of_type("final")} == {"de"}
    assert {f["language"] for f in translated.of_type("final")} == {"en"}
    assert {f["model"] for f in translated.of_type("final")} == {"canary-1b"}


def test_status_lists_every_engine_with_the_reason(tiny_nemo: dict[str, Path], tmp_path: Path) -> None:
    rows = {(s.model, s.variant): s for s in EngineRegistry(Settings(cache_dir=tmp_path)).status()}
    assert set(rows) >= {
        ("parakeet", "standard"),
        ("parakeet", "onnx"),
        ("parakeet", "mlx"),
        ("canary", "standard"),
    }
    assert not rows["parakeet", "standard"].available
    assert (
        rows["parakeet", "standard"].reason == "no weights configured: set STREAMSCRIBE_NEMO__PARAKEET_MODEL"
    )
    assert rows["canary", "standard"].reason == "no weights configured: set STREAMSCRIBE_NEMO__CANARY_MODEL"

    configured = Settings(
        cache_dir=tmp_path,
        nemo={"parakeet_model": str(tiny_nemo["tdt"]), "parakeet_onnx_dir": str(tmp_path / "missing")},
    )
    rows = {(s.model, s.variant): s for s in EngineRegistry(configured).status()}
    assert rows["parakeet", "standard"].available and rows["parakeet", "standard"].reason is None
    assert not rows["parakeet", "onnx"].available
    assert "missing folder" in (rows["parakeet", "onnx"].reason or "")


def test_status_endpoint_shows_availability(
    tiny_nemo: dict[str, Path], make_server: Callable[..., Any]
) -> None:
    running = nemo_server(make_server, canary_model=tiny_nemo["canary"])
    body = httpx.get(
        f"{running.base_url}/api/v1/audio/stream/status", headers={"X-API-Key": running.api_key}
    ).json()
    rows = {(row["model"], row["variant"]): row for row in body["engines"]}
    assert rows["canary", "standard"]["available"] is True
    assert rows["canary", "standard"]["languages"] == ["en", "es", "de", "fr"]
    assert rows["parakeet", "mlx"]["available"] is False
    assert "STREAMSCRIBE_NEMO__PARAKEET_MLX_DIR" in rows["parakeet", "mlx"]["reason"]


def test_hub_model_name_offline_is_unavailable_without_loading_nemo(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, nemo={"parakeet_model": "nvidia/parakeet-tdt-0.6b-v2"})
    rows = {(s.model, s.variant): s for s in EngineRegistry(settings).status()}
    assert not rows["parakeet", "standard"].available
    assert "HF_HUB_OFFLINE" in (rows["parakeet", "standard"].reason or "")


def test_missing_model_file_fails_fast_with_a_clear_error(
    make_server: Callable[..., Any], speech: np.ndarray, tmp_path: Path
) -> None:
    running = nemo_server(make_server, parakeet_model=tmp_path / "absent.nemo")
    started = time.monotonic()
    result = running.stream(speech[:SAMPLE_RATE], config={"model": "parakeet"}, speed=0, finish="stop")
    assert time.monotonic() - started < 10
    assert result.close_code == 1011
    assert result.error is not None and result.error["error_type"] == "model_unavailable"
    assert (
        "STREAMSCRIBE_NEMO__PARAKEET_MODEL points at a missing file (absent.nemo)" in result.error["message"]
    )
    assert str(tmp_path) not in result.error["message"]
