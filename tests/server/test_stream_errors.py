"""Every error case of the protocol, through the real server: its error frame and its close code."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamscribe.engines.base import AudioWindow, Transcript
from tests.conftest import RunningServer, normalize_text


async def _exchange(
    url: str, messages: Sequence[str | bytes], headers: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], int | None]:
    """Send messages, then collect frames until the server closes (or 20 s pass)."""
    frames: list[dict[str, Any]] = []
    async with connect(url, additional_headers=headers) as ws:

        async def send_all() -> None:
            with contextlib.suppress(ConnectionClosed):
                for message in messages:
                    await ws.send(message)

        sender = asyncio.create_task(send_all())
        with contextlib.suppress(ConnectionClosed):
            async with asyncio.timeout(20):
                async for raw in ws:
                    frames.append(json.loads(raw))
        await sender
        return frames, ws.close_code


def exchange(
    url: str, *messages: str | bytes, headers: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], int | None]:
    return asyncio.run(_exchange(url, messages, headers))


def config(**fields: Any) -> str:
    return json.dumps({"type": "config", **fields})


def audio(samples: np.ndarray) -> str:
    return json.dumps({"type": "audio", "data": base64.b64encode(samples.astype("<f4").tobytes()).decode()})


STOP = json.dumps({"type": "stop"})


@pytest.mark.parametrize("token", [None, "wrong-key"])
def test_missing_or_wrong_key_closes_4401(server: RunningServer, token: str | None) -> None:
    url = server.ws_url(token="") if token is None else server.ws_url(token=token)
    frames, code = exchange(url, config())
    assert code == 4401
    assert frames == [frames[0]] and frames[0]["type"] == "error" and frames[0]["error_type"] == "auth_failed"


@pytest.mark.parametrize("header", ["X-API-KEY", "Authorization"])
def test_key_accepted_in_headers(server: RunningServer, header: str) -> None:
    value = server.api_key if header == "X-API-KEY" else f"Bearer {server.api_key}"
    frames, code = exchange(server.ws_url(token=""), config(), STOP, headers={header: value})
    assert code == 1000
    assert [f["type"] for f in frames] == ["status", "status", "full_transcript"]


def test_no_config_in_time_closes_4400(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(streaming={"config_timeout_seconds": 0.5})
    frames, code = exchange(server.ws_url())
    assert code == 4400
    assert frames[0]["error_type"] == "timeout"


def test_audio_before_config_closes_4400(server: RunningServer) -> None:
    frames, code = exchange(server.ws_url(), audio(np.zeros(1600, dtype=np.float32)))
    assert code == 4400
    assert frames[0]["error_type"] == "bad_request" and "config" in frames[0]["message"]
    assert frames[0]["fatal"] is True


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"sample_rate": 1000}, "sample_rate"),
        ({"model": "gpt-4"}, "unknown model"),
        ({"audio_format": "mp3"}, "audio_format"),
        ({"partial_interval": "soon"}, "partial_interval"),
    ],
)
def test_invalid_config_closes_4400(server: RunningServer, fields: dict[str, Any], reason: str) -> None:
    frames, code = exchange(server.ws_url(), config(**fields))
    assert code == 4400
    assert frames[0]["error_type"] == "bad_request" and reason in frames[0]["message"]


def test_not_json_first_closes_4400(server: RunningServer) -> None:
    frames, code = exchange(server.ws_url(), "hello")
    assert code == 4400
    assert "JSON" in frames[0]["message"]


def test_bad_frames_get_errors_and_the_session_continues(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    too_big = base64.b64encode(b"\0" * (server.settings.streaming.max_frame_bytes + 8)).decode()
    frames, code = exchange(
        server.ws_url(),
        config(),
        json.dumps({"type": "audio", "data": "%%% not base64 %%%"}),
        json.dumps({"type": "audio", "data": base64.b64encode(b"\0\0\0").decode()}),
        audio(np.array([0.0, np.nan, 0.1], dtype=np.float32)),
        audio(np.array([np.inf], dtype=np.float32)),
        json.dumps({"type": "audio", "data": too_big}),
        json.dumps({"type": "dance"}),
        "{broken",
        b"\x00\x01",
        config(),
        audio(clip("short.wav")),
        STOP,
    )
    assert code == 1000
    errors = [f for f in frames if f["type"] == "error"]
    # A binary frame after the config is audio in its format: two bytes are not a float32 sample.
    kinds = ["invalid_audio"] * 5 + ["bad_request"] * 2 + ["invalid_audio", "bad_request"]
    assert [e["error_type"] for e in errors] == kinds
    assert not any(e["fatal"] for e in errors), "the session goes on"
    assert "base64" in errors[0]["message"]
    assert "multiple" in errors[1]["message"]
    assert "NaN" in errors[2]["message"] and "NaN" in errors[3]["message"]
    assert "larger" in errors[4]["message"]
    assert "unknown message type" in errors[5]["message"]
    assert "4-byte float32" in errors[7]["message"]
    assert "quarterly report" in normalize_text(frames[-1]["text"])


def test_unavailable_model_falls_back_with_a_warning(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    result = server.stream(clip("short.wav"), speed=0, config={"model": "parakeet-onnx"})
    warning = result.of_type("warning")[0]
    assert warning["fallback"] is True
    assert warning["original_model"] == "parakeet-onnx"
    assert warning["active_model"] == "whisper-tiny.en"
    configured = result.of_type("status")[0]
    assert (configured["model"], configured["variant"]) == ("parakeet", "onnx")
    assert {f["model"] for f in result.of_type("final")} == {"whisper-tiny.en"}


def test_an_engine_name_is_a_model_name(server: RunningServer) -> None:
    frames, code = exchange(server.ws_url(), config(model="whisper-tiny.en"), STOP)
    assert code == 1000
    states = [(f["state"], f["model"]) for f in frames if f["type"] == "status"]
    assert states == [("configured", "whisper"), ("ready", "whisper-tiny.en")]


def test_fallback_disabled_closes_1011(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(allow_fallback=False)
    frames, code = exchange(server.ws_url(), config(model="canary-1b"))
    assert code == 1011
    assert frames[-1]["type"] == "error" and frames[-1]["error_type"] == "model_unavailable"


class _BrokenEngine:
    """Loads fine, fails on every decode: the corner a real model reaches when it runs out of memory."""

    name = "whisper-broken"
    sample_rate = 16000
    languages = frozenset({"en"})

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        raise RuntimeError("out of memory")


def test_engine_failure_closes_1011(
    make_server: Callable[..., RunningServer], clip: Callable[[str], np.ndarray]
) -> None:
    server = make_server()
    runtime = server.app.state.runtime
    runtime.registry.get = lambda *choice: _BrokenEngine()
    result = server.stream(clip("short.wav"), speed=0)
    assert result.close_code == 1011
    assert result.error is not None and result.error["error_type"] == "internal_error"
    assert "out of memory" not in result.error["message"], "internals leaked to the client"


def test_api_key_never_logged(
    make_server: Callable[..., RunningServer], clip: Callable[[str], np.ndarray], captured_logs: list[str]
) -> None:
    server = make_server(log_level="debug")
    server.stream(clip("short.wav"), speed=0)
    exchange(server.ws_url(token="wrong-" + server.api_key[:10]), config())
    assert any("WebSocket" in line for line in captured_logs), "expected uvicorn's connection log lines"
    server_lines = [line for line in captured_logs if not line.startswith("websockets.client")]
    assert not [line for line in server_lines if server.api_key in line or "wrong-" in line]


def test_streams_over_the_server_limit_are_refused_1013(
    make_server: Callable[..., RunningServer], clip: Callable[[str], np.ndarray]
) -> None:
    server = make_server(max_streams=1)

    async def two_streams() -> tuple[list[dict[str, Any]], int | None]:
        async with connect(server.ws_url()) as first:
            await first.send(config())
            await first.recv()
            await first.recv()  # configured, ready: the slot is taken
            second = await _exchange(server.ws_url(), [config()])
        return second

    frames, code = asyncio.run(two_streams())
    assert code == 1013
    assert frames[-1]["error_type"] == "server_busy" and "limit of 1" in frames[-1]["message"]
    # The slot is free again once the first stream has gone.
    assert exchange(server.ws_url(), config(), STOP)[1] == 1000


def test_a_language_whisper_does_not_know_is_an_invalid_config(server: RunningServer) -> None:
    frames, code = exchange(server.ws_url(), config(language="xx"))
    assert code == 4400
    assert frames[-1]["error_type"] == "bad_request" and "language 'xx'" in frames[-1]["message"]
