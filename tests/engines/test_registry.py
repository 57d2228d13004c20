"""The registry's engine choice: the names clients send, the fallback rule, and the model hub left offline."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from streamscribe.config import Settings
from streamscribe.engines.base import EngineUnavailable
from streamscribe.engines.registry import EngineRegistry, UnknownModel, resolve_model
from tests.streaming.fakes import ScriptedEngine


@pytest.mark.parametrize(
    ("name", "variant", "expected"),
    [
        ("parakeet", "onnx", ("parakeet", "onnx")),
        ("parakeet-onnx", "standard", ("parakeet", "onnx")),
        ("parakeet-mlx", "standard", ("parakeet", "mlx")),
        ("canary-1b", "standard", ("canary", "standard")),
        ("canary-standard", "standard", ("canary", "standard")),
        ("whisper-1", "standard", ("whisper", "standard")),
        ("Whisper", "standard", ("whisper", "standard")),
        ("whisper-tiny.en", "standard", ("whisper", "standard")),
    ],
)
def test_model_names_and_aliases(name: str, variant: str, expected: tuple[str, str]) -> None:
    assert resolve_model(name, variant) == expected


def test_every_name_the_server_lists_is_one_it_accepts(tmp_path: Path) -> None:
    for row in EngineRegistry(Settings(cache_dir=tmp_path)).status():
        assert resolve_model(f"{row.model}-{row.variant}") == (row.model, row.variant)


@pytest.mark.parametrize("name", ["gpt-4", "whisperx", ""])
def test_unknown_model_names_are_refused(name: str) -> None:
    with pytest.raises(UnknownModel, match="unknown model"):
        resolve_model(name)


def test_unavailable_engine_falls_back_to_whisper_with_the_reason(tmp_path: Path) -> None:
    choice = EngineRegistry(Settings(cache_dir=tmp_path)).choose_engine("parakeet", "onnx", "en")
    assert choice.engine.name == "whisper-tiny.en"
    reason = choice.fallback_reason or ""
    assert reason.startswith("parakeet (onnx) is unavailable here (")
    assert reason.endswith("; using whisper-tiny.en")


def test_without_fallback_an_unavailable_engine_is_an_error(tmp_path: Path) -> None:
    registry = EngineRegistry(Settings(cache_dir=tmp_path, allow_fallback=False))
    with pytest.raises(EngineUnavailable, match=r"canary \(standard\) is unavailable: "):
        registry.choose_engine("canary", "standard", "en")


def test_model_hub_is_offline_unless_told_otherwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    EngineRegistry(Settings(cache_dir=tmp_path))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    EngineRegistry(Settings(cache_dir=tmp_path))
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def test_a_slow_engine_load_holds_up_no_other_engine() -> None:
    """A client asking for an engine that takes seconds to load must not stall everyone else's start."""
    registry = EngineRegistry(Settings())
    loaded = registry.load_once("loaded", ScriptedEngine)
    started, release = threading.Event(), threading.Event()

    def slow() -> ScriptedEngine:
        started.set()
        release.wait(10)
        return ScriptedEngine()

    loading = threading.Thread(target=registry.load_once, args=("slow", slow))
    loading.start()
    assert started.wait(10)
    began = time.monotonic()
    assert registry.load_once("loaded", ScriptedEngine) is loaded
    assert registry.load_once("another", ScriptedEngine) is not loaded  # loads beside the slow one
    assert time.monotonic() - began < 2.0 and loading.is_alive()
    release.set()
    loading.join(10)
    assert isinstance(registry.load_once("slow", slow), ScriptedEngine)
