"""A configured NeMo engine loads at start-up, behind a 503 ``/readyz``; one stream whose engine step fails
ends alone, not with every stream that shared the step. Tiny random-weight models, the real server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from streamscribe.client import StreamResult, stream_audio
from streamscribe.engines.base import EngineStream, StreamUpdate
from streamscribe.engines.registry import EngineRegistry
from tests.engines.tiny_nemo import SAMPLE_RATE

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def speech(clip: Callable[[str], np.ndarray]) -> np.ndarray:
    return np.concatenate([clip("short.wav"), np.zeros(SAMPLE_RATE, np.float32)])


def test_configured_engines_preload_behind_a_503_readyz_without_holding_up_other_engines(
    tiny_nemo: dict[str, Path],
    make_server: Callable[..., Any],
    speech: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The tiny model loads in a second; a gate makes it take as long as the test needs (a real one: 10-25 s).
    gate = threading.Event()
    real_load = EngineRegistry._load_nemo_family

    def slow_load(self: EngineRegistry, model: str, variant: str) -> Any:
        gate.wait(timeout=60)
        return real_load(self, model, variant)

    monkeypatch.setattr(EngineRegistry, "_load_nemo_family", slow_load)
    running = make_server(preload=True, nemo={"parakeet_model": str(tiny_nemo["tdt"])})
    try:
        ready = httpx.get(f"{running.base_url}/readyz")
        assert ready.status_code == 503 and ready.json()["models_loaded"] is False
        assert ready.json()["loaded"] == ["whisper-tiny.en"]

        async def while_loading() -> tuple[StreamResult, StreamResult]:
            parakeet = asyncio.create_task(
                stream_audio(running.ws_url(), speech, SAMPLE_RATE, config={"model": "parakeet"}, speed=0)
            )
            whisper = await stream_audio(running.ws_url(), speech, SAMPLE_RATE, speed=0)
            assert not parakeet.done(), "the parakeet stream waits for its engine's load"
            gate.set()
            return whisper, await parakeet

        whisper, parakeet = asyncio.run(while_loading())
    finally:
        gate.set()
    assert whisper.error is None and "quarterly report" in (whisper.full_transcript or "").lower()
    assert parakeet.error is None, parakeet.error
    assert [f["model"] for f in parakeet.of_type("status") if f["state"] == "ready"] == ["parakeet-standard"]
    ready = httpx.get(f"{running.base_url}/readyz")
    assert ready.status_code == 200
    assert sorted(ready.json()["loaded"]) == ["parakeet-standard", "whisper-tiny.en"]


def test_a_stream_whose_step_fails_ends_alone_and_the_others_in_its_step_go_on(
    tiny_nemo: dict[str, Path], make_server: Callable[..., Any], speech: np.ndarray
) -> None:
    running = make_server(preload=False, allow_fallback=False, nemo={"parakeet_model": str(tiny_nemo["tdt"])})
    engine = running.app.state.runtime.registry.get("parakeet", "standard", "en")
    # The corner: the second stream's decoder state breaks at its third piece, and every step holding it
    # fails from then on. Steps wait until all three streams have begun: the first step holds the first
    # stream's piece, the second and third streams' pieces wait, and from then on they share steps.
    opened: list[EngineStream] = []
    all_open = threading.Event()
    doomed_pieces = 0
    shared_steps_failed: list[int] = []
    real_open, real_step = engine.open_stream, engine.stream_step

    def open_stream(language: str) -> EngineStream:
        stream = real_open(language)
        opened.append(stream)
        if len(opened) == 3:
            all_open.set()
        return stream

    def stream_step(pieces: Sequence[tuple[EngineStream, np.ndarray]]) -> list[StreamUpdate]:
        nonlocal doomed_pieces
        all_open.wait(timeout=30)
        if any(stream is opened[1] for stream, _ in pieces):
            doomed_pieces += 1
            if doomed_pieces >= 3:
                if len(pieces) > 1:
                    shared_steps_failed.append(len(pieces))
                raise RuntimeError("this stream's decoder state is broken")
        return real_step(pieces)

    engine.open_stream, engine.stream_step = open_stream, stream_step
    config = {"model": "parakeet", "enable_partial": False}

    async def together() -> list[StreamResult]:
        results = []
        for _ in range(3):  # one after another, so that their utterances open in this order
            stream = stream_audio(running.ws_url(), speech, SAMPLE_RATE, config=config, speed=0)
            results.append(asyncio.create_task(stream))
            await asyncio.sleep(0.3)
        return list(await asyncio.gather(*results))

    first, doomed, third = asyncio.run(together())
    assert shared_steps_failed, "the failing stream shared a step with another one"
    assert doomed.error is not None and doomed.error["error_type"] == "internal_error"
    assert doomed.close_code == 1011
    for healthy in (first, third):
        assert healthy.error is None, healthy.error
        assert healthy.of_type("final") and healthy.full_transcript, "a healthy stream got its finals"
