"""The faster-whisper engine on the bundled models, and clear errors for missing ones."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from streamscribe.config import Settings
from streamscribe.engines.base import AudioWindow, Engine, EngineUnavailable
from streamscribe.engines.bundled import BUNDLED_WHISPER_MODELS
from streamscribe.engines.registry import EngineRegistry
from streamscribe.engines.whisper import WhisperEngine
from tests.conftest import normalize_text


def test_engine_transcribes_a_batch_in_order(tmp_path: Path, clip: Callable[[str], np.ndarray]) -> None:
    engine = WhisperEngine("tiny.en", tmp_path)
    assert isinstance(engine, Engine)
    assert engine.name == "whisper-tiny.en" and engine.languages == {"en"} and engine.sample_rate == 16000
    speech = clip("short.wav")
    results = engine.transcribe(
        [
            AudioWindow(speech, "en", final=True, word_timestamps=True),
            AudioWindow(np.zeros(16000, np.float32), "en", final=False),
        ]
    )
    assert "quarterly report" in results[0].text.lower()
    assert results[0].words and results[0].words[0].start < results[0].words[-1].end <= 3.2
    assert results[1].text == ""


def test_sized_encoder_gives_the_same_text_as_the_padded_one(
    tmp_path: Path, clip: Callable[[str], np.ndarray]
) -> None:
    speech = clip("short.wav")
    window = AudioWindow(speech, "en", final=True)
    sized = WhisperEngine("tiny.en", tmp_path, min_encoder_seconds=15).transcribe([window])
    padded = WhisperEngine("tiny.en", tmp_path, min_encoder_seconds=30).transcribe([window])
    assert sized[0].text == padded[0].text


def test_a_local_folder_can_be_used(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    shutil.copytree(BUNDLED_WHISPER_MODELS["tiny.en"].locate(tmp_path), folder)
    assert WhisperEngine(str(folder), tmp_path).name == "whisper-my-model"


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="neither a bundled model"):
        WhisperEngine(str(tmp_path / "nowhere"), tmp_path)


def test_registry_loads_each_model_once_and_rejects_unsupported_languages(tmp_path: Path) -> None:
    registry = EngineRegistry(Settings(cache_dir=tmp_path, whisper={"multilingual_model": "tiny.en"}))
    first = registry.get("whisper", "standard", "en")
    assert registry.get("whisper", "standard", "en") is first
    with pytest.raises(EngineUnavailable, match="does not transcribe language 'de'"):
        registry.get("whisper", "standard", "de")


def test_registry_reports_unavailable_engines_with_reasons(tmp_path: Path) -> None:
    rows = EngineRegistry(Settings(cache_dir=tmp_path)).status()
    whisper = next(r for r in rows if r.model == "whisper")
    assert whisper.available and whisper.reason is None
    assert {(r.model, r.variant) for r in rows} >= {
        ("parakeet", "standard"),
        ("parakeet", "onnx"),
        ("parakeet", "mlx"),
        ("canary", "standard"),
    }
    assert all(r.reason for r in rows if not r.available)
    broken = EngineRegistry(
        Settings(cache_dir=tmp_path, whisper={"english_model": "/no/such/model"})
    ).status()
    assert "neither a bundled model" in (next(r for r in broken if r.model == "whisper").reason or "")


def test_partials_and_finals_encode_their_own_window_sizes(
    tmp_path: Path, clip: Callable[[str], np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from faster_whisper import WhisperModel

    engine = WhisperEngine("tiny.en", tmp_path, min_encoder_seconds=15, partial_encoder_seconds=10)
    frames: list[int] = []
    padded_encode = WhisperModel.encode

    def record(self: WhisperModel, features: np.ndarray) -> object:
        frames.append(features.shape[-1])
        return padded_encode(self, features)

    monkeypatch.setattr(WhisperModel, "encode", record)
    speech = clip("short.wav")
    partial, final = engine.transcribe([AudioWindow(speech, "en", final=False), AudioWindow(speech, "en")])
    long_partial = engine.transcribe([AudioWindow(clip("long.wav")[: 12 * 16000], "en", final=False)])
    assert frames == [1000, 1500, 1500]  # 3 s: 10 s and 15 s windows; 12 s: too long for 10 s
    assert "quarterly report" in partial.text.lower() and "quarterly report" in final.text.lower()
    assert long_partial[0].text


def test_greedy_windows_decoded_together_give_the_same_text_as_one_by_one(
    tmp_path: Path, clip: Callable[[str], np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from faster_whisper import WhisperModel

    engine = WhisperEngine("tiny.en", tmp_path)
    speech = clip("long.wav")
    windows = [
        AudioWindow(speech[16000 * start : 16000 * (start + seconds)], "en", final=False, **extra)
        for start, seconds, extra in [
            (0, 3, {}),
            (4, 5, {"prompt": "Please send the quarterly report."}),
            (10, 6, {"prefix": "The"}),
            (17, 4, {}),
            (22, 8, {"prompt": "Check the tire pressure."}),
        ]
    ]
    alone = [engine.transcribe([window])[0].text for window in windows]
    encoded: list[tuple[int, ...]] = []
    padded_encode = WhisperModel.encode

    def record(self: WhisperModel, features: np.ndarray) -> object:
        encoded.append(features.shape)
        return padded_encode(self, features)

    monkeypatch.setattr(WhisperModel, "encode", record)
    together = [transcript.text for transcript in engine.transcribe(windows)]
    assert encoded == [(3, 80, 1000), (2, 80, 1000)]  # windows without context, then with it
    assert together == alone and all(together)
    assert together[2].startswith("The")


def test_finals_while_the_server_is_behind_share_one_decode_with_a_small_beam(
    tmp_path: Path, clip: Callable[[str], np.ndarray]
) -> None:
    engine = WhisperEngine("tiny.en", tmp_path, busy_beam_size=2)
    model = engine._model.model
    calls: list[tuple[int, int]] = []

    class RecordingModel:
        """CTranslate2's model, with each generate call's batch and beam noted."""

        def __getattr__(self, name: str) -> object:
            return getattr(model, name)

        def generate(self, features: object, prompts: list[list[int]], **options: object) -> object:
            calls.append((len(prompts), int(options.get("beam_size", 1))))  # type: ignore[call-overload]
            return model.generate(features, prompts, **options)

    engine._model.model = RecordingModel()
    speech = clip("long.wav")
    fast = [
        AudioWindow(speech[: 16000 * 4], "en", fast=True),
        AudioWindow(speech[16000 * 4 : 16000 * 7], "en", fast=True),
    ]
    partials = [AudioWindow(window.samples, "en", final=False) for window in fast]
    finals = engine.transcribe(fast)
    assert calls == [(2, 2)]  # both finals in one call, with the busy beam
    engine.transcribe(partials)
    assert calls[1:] == [(2, 1)]  # partials stay greedy
    assert all(final.text for final in finals)
    assert "quarterly report" in normalize_text(finals[0].text)


def test_prompts_decoded_together_keep_the_same_number_of_context_tokens() -> None:
    from streamscribe.engines.whisper import _aligned_prompts

    prev, sot = 7, 9
    assert _aligned_prompts([[prev, 1, 2, 3, sot, 5], [prev, 4, sot, 6]], sot) == [
        [prev, 3, sot, 5],
        [prev, 4, sot, 6],
    ]
    assert _aligned_prompts([[prev, 1, sot, 5], [sot, 6]], sot) == [[sot, 5], [sot, 6]]


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory: pytest.TempPathFactory) -> WhisperEngine:
    return WhisperEngine("tiny.en", tmp_path_factory.mktemp("cache"))


# Windows of 12-15 s that once came back with text written again, when the speech filled the encoder's
# window up to its end: "...without complain. Slowly and without complain.", "...at four, the meeting was
# moved to Tuesday afternoon at four, ...", "...taken taken taken ...".
_FILLED_WINDOWS = [
    ("long_sentence.wav", 0.0, 13.0),
    ("long_sentence.wav", 0.0, 15.0),
    ("long_sentence.wav", 1.7, 14.0),
    ("long.wav", 8.5, 13.0),
    ("long.wav", 8.5, 15.0),
    ("long.wav", 3.4, 13.0),
]


@pytest.mark.parametrize("fast", [False, True], ids=["beam", "greedy"])
def test_finals_of_long_utterances_never_write_text_twice(
    tiny_en: WhisperEngine, clip: Callable[[str], np.ndarray], fast: bool
) -> None:
    from streamscribe.engines.repetition import find_repeated_run, spoken_words

    windows = [
        AudioWindow(clip(name)[int(start * 16000) : int((start + length) * 16000)], "en", fast=fast)
        for name, start, length in _FILLED_WINDOWS
    ]
    for transcript in tiny_en.transcribe(windows):
        assert transcript.text
        assert find_repeated_run(spoken_words(transcript.text)) is None, transcript.text


def test_speech_that_really_repeats_itself_keeps_every_copy(
    tiny_en: WhisperEngine, clip: Callable[[str], np.ndarray]
) -> None:
    # A final (beam search): greedy partials of this window came to read only three of the four copies
    # with the packages installed on 2026-12-02, before any repetition check (the model's own reading).
    (transcript,) = tiny_en.transcribe([AudioWindow(np.tile(clip("short.wav"), 4), "en", final=True)])
    assert normalize_text(transcript.text).count("quarterly report") == 4, transcript.text


def test_a_long_window_with_a_long_prompt_and_prefix_stays_within_whisper_s_token_limit(
    tiny_en: WhisperEngine, clip: Callable[[str], np.ndarray]
) -> None:
    # 56 s with no pause once asked for 450 new tokens, past Whisper's ceiling of 448 with any prompt.
    speech = clip("continuous.wav")
    prompt = " ".join(["The quarterly report went to the finance team on Friday."] * 20)[:1000]
    windows = [
        AudioWindow(speech, "en", prompt=prompt),
        AudioWindow(speech[: 25 * 16000], "en", fast=True, prompt=prompt, prefix="Please send the"),
        AudioWindow(speech[: 12 * 16000], "en", final=False, prompt=prompt, prefix="Please send the"),
    ]
    for transcript in tiny_en.transcribe(windows):
        assert "quarterly report" in normalize_text(transcript.text)
