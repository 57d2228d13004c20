"""Moonshine base-en with the model moonshine-cpp ships: its tokenizer file, batching that changes no text,
the English-only rule and the way a runaway decode ends."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamscribe.config import Settings
from streamscribe.engines.base import AudioWindow, EngineUnavailable
from streamscribe.engines.moonshine import MoonshineEngine, read_tokenizer, shipped_model_dir
from streamscribe.engines.registry import EngineRegistry
from tests.conftest import word_error_rate


@pytest.fixture(scope="module")
def engine(moonshine_cache: Path) -> MoonshineEngine:
    return MoonshineEngine(moonshine_cache)


def test_tokenizer_file_holds_short_long_and_empty_tokens(tmp_path: Path) -> None:
    long = "\u2581" + "a" * 300  # 303 bytes: a two-byte length
    data = bytes([3]) + b"<s>" + bytes([0]) + bytes([303 % 128 + 128, 303 // 128]) + long.encode()
    (tmp_path / "tokenizer.bin").write_bytes(data)
    assert read_tokenizer(tmp_path / "tokenizer.bin") == [b"<s>", b"", long.encode()]


def test_windows_decoded_together_read_as_each_alone(
    engine: MoonshineEngine, clip: Callable[[str], np.ndarray], manifest: dict[str, dict[str, Any]]
) -> None:
    samples = clip("long.wav")
    segments = manifest["long.wav"]["segments"][1:4]
    windows = [
        AudioWindow(samples[int((s["start"] - 0.2) * 16000) : int((s["end"] + 0.3) * 16000)], "en")
        for s in segments
    ]
    together = [t.text for t in engine.transcribe(windows)]
    alone = [engine.transcribe([window])[0].text for window in windows]
    assert together == alone  # windows of different lengths: padded frames get no attention
    for segment, text in zip(segments, together, strict=True):
        assert word_error_rate(segment["text"], text) <= 0.2, text


def test_a_tenth_of_a_second_or_less_is_no_text(engine: MoonshineEngine) -> None:
    quiet = np.zeros(800, dtype=np.float32)
    assert [t.text for t in engine.transcribe([AudioWindow(quiet, "en")])] == [""]


def test_moonshine_does_not_translate(engine: MoonshineEngine, clip: Callable[[str], np.ndarray]) -> None:
    with pytest.raises(EngineUnavailable, match="English-only"):
        engine.transcribe([AudioWindow(clip("short.wav"), "en", task="translate")])


def test_a_decode_that_runs_into_its_bound_keeps_the_phrase_once(engine: MoonshineEngine) -> None:
    tokens = read_tokenizer(shipped_model_dir() / "tokenizer.bin")
    phrase = [tokens.index("\u2581the".encode()), tokens.index("\u2581train".encode())]
    words = phrase * 5
    assert engine._text(words, bounded=True) == "the train"
    assert engine._text(words, bounded=False) == " ".join(["the train"] * 5)


def test_other_languages_fall_back_to_whisper(moonshine_cache: Path) -> None:
    registry = EngineRegistry(Settings(cache_dir=moonshine_cache))
    choice = registry.choose_engine("moonshine", "standard", "es")
    assert choice.engine.name == "whisper-base"
    assert "moonshine-base-en does not transcribe language 'es'" in (choice.fallback_reason or "")


def test_missing_package_says_which_extra_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamscribe.engines import registry

    def missing(name: str) -> None:
        if name == "moonshine-cpp":
            raise EngineUnavailable(name)

    monkeypatch.setattr(registry, "_require_distribution", missing)
    row = next(r for r in EngineRegistry(Settings(cache_dir=tmp_path)).status() if r.model == "moonshine")
    assert not row.available
    assert row.reason == "package moonshine-cpp is not installed (pip install 'streamscribe[moonshine]')"
