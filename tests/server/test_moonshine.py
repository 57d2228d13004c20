"""Moonshine through the real server: a live stream in the seed protocol, the OpenAI file API, and the
engine lists (/status, /v1/models)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import DATA, RunningServer, start_server, word_error_rate

REFERENCE = "Please send the quarterly report to the finance team by Friday."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, moonshine_cache: Path) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("moonshine-server"), cache_dir=moonshine_cache)
    yield running
    running.stop()


def test_a_live_stream_on_moonshine_has_partials_and_finals(
    server: RunningServer, clip: Callable[[str], np.ndarray], manifest: dict[str, dict[str, Any]]
) -> None:
    config = {"model": "moonshine", "language": "en"}
    result = server.stream(clip("long_sentence.wav"), config=config, speed=2.0)
    assert result.close_code == 1000
    ready = next(f for f in result.of_type("status") if f["state"] == "ready")
    assert ready["model"] == "moonshine-base-en" and not ready.get("warning")
    finals = result.of_type("final")
    assert {f["model"] for f in finals + result.of_type("partial")} == {"moonshine-base-en"}
    assert result.of_type("partial"), "a 17 s sentence shows partials"
    reference = manifest["long_sentence.wav"]["reference"]
    assert word_error_rate(reference, " ".join(f["text"] for f in finals)) <= 0.2


def test_the_file_api_transcribes_with_moonshine(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0)
    with open(DATA / "short.wav", "rb") as audio:
        result = client.audio.transcriptions.create(model="moonshine", file=audio)
    assert word_error_rate(REFERENCE, result.text) <= 0.2
    models = [model.id for model in client.models.list()]
    assert "moonshine-standard" in models and "moonshine-base-en" in models


def test_status_lists_moonshine_as_available(server: RunningServer) -> None:
    engines = httpx.get(f"{server.base_url}/api/v1/audio/stream/status").json()["engines"]
    row = next(e for e in engines if e["model"] == "moonshine")
    assert row == {
        "model": "moonshine",
        "variant": "standard",
        "languages": ["en"],
        "available": True,
        "reason": None,
    }
