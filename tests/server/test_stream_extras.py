"""Streaming extras through the real server and models: word timing, translation, prompt/hotwords, pings."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from streamscribe.engines.base import AudioWindow, Engine, Transcript
from streamscribe.protocol import ConfigMessage
from tests.conftest import RunningServer, normalize_text


def test_finals_carry_word_timestamps_inside_their_segment(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    result = server.stream(clip("long.wav")[: 16000 * 20], speed=0, config={"word_timestamps": True})

    finals = result.of_type("final")
    assert len(finals) >= 2
    for final in finals:
        words = final["words"]
        assert words, final
        assert set(words[0]) == {"word", "start", "end", "probability"}
        assert normalize_text(" ".join(w["word"] for w in words)) == normalize_text(final["text"])
        for word in words:
            assert final["start"] <= word["start"] <= word["end"] <= final["end"], (word, final)
            assert 0.0 <= word["probability"] <= 1.0
        assert all(a["start"] <= b["start"] for a, b in itertools.pairwise(words)), "not monotonic"
    every = [w for f in finals for w in f["words"]]
    assert all(a["end"] <= b["start"] + 1e-3 for a, b in itertools.pairwise(every))
    assert not any("words" in p for p in result.of_type("partial")), "partials carry no word timing"


def test_finals_have_no_words_unless_asked(server: RunningServer, clip: Callable[[str], np.ndarray]) -> None:
    result = server.stream(clip("short.wav"), speed=0)
    assert result.of_type("final") and not any("words" in f for f in result.of_type("final"))


def test_spanish_speech_translated_to_english(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    result = server.stream(clip("es.wav"), speed=0, config={"language": "es", "task": "translate"})

    ready = next(f for f in result.of_type("status") if f["state"] == "ready")
    assert ready["model"] == "whisper-base"
    text = normalize_text(result.full_transcript or "")
    assert "train" in text and "hospital" in text and "works" in text, text
    assert "tren" not in text and "hermana" not in text


def test_translate_with_the_default_language_uses_the_multilingual_model(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    # "en" is the protocol's default: tiny.en cannot translate, so base answers even then, and Whisper,
    # told the speech is English, still writes English for the Spanish it hears.
    result = server.stream(clip("es.wav"), speed=0, config={"task": "translate"})

    finals = result.of_type("final")
    assert finals and {f["model"] for f in finals} == {"whisper-base"}
    text = normalize_text(result.full_transcript or "")
    assert "train" in text and "hospital" in text, text


class _RecordingEngine:
    """The real engine, recording every window it is given."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.windows: list[AudioWindow] = []
        self.name, self.sample_rate, self.languages = engine.name, engine.sample_rate, engine.languages

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        self.windows.extend(batch)
        return self._engine.transcribe(batch)


def test_prompt_and_hotwords_reach_the_engine(
    make_server: Callable[..., RunningServer], clip: Callable[[str], np.ndarray]
) -> None:
    server = make_server()
    runtime = server.app.state.runtime
    real = runtime.registry.get("whisper", "standard", "en")
    recording = _RecordingEngine(real)
    runtime.registry.get = lambda *choice: recording

    config = {"prompt": "Quarterly finance meeting.", "hotwords": ["Friday", "finance team"]}
    result = server.stream(clip("long.wav")[: 16000 * 8], speed=0, config=config)

    assert "quarterly report" in normalize_text(result.full_transcript or "")
    assert recording.windows
    assert all(w.hotwords == "Friday, finance team" for w in recording.windows)
    assert all((w.prompt or "").startswith("Quarterly finance meeting.") for w in recording.windows)
    # Later windows also get the stream's own previous text after the client's prompt.
    assert any("quarterly report" in normalize_text(w.prompt or "") for w in recording.windows)


def test_config_accepts_hotwords_as_a_string_and_rejects_a_huge_prompt() -> None:
    assert ConfigMessage(type="config", hotwords="  Kubernetes ").hotwords == "Kubernetes"
    assert ConfigMessage(type="config", prompt="").prompt is None
    assert ConfigMessage.model_validate({"type": "config"}).task == "transcribe"
    from streamscribe.protocol import StreamError, parse_client_message

    try:
        parse_client_message(json.dumps({"type": "config", "prompt": "x" * 5000}))
    except StreamError as error:
        assert "prompt" in error.message
    else:
        raise AssertionError("a 5000-character prompt was accepted")


def test_ping_is_answered_with_pong_before_and_after_config(server: RunningServer) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with connect(server.ws_url()) as ws:
            await ws.send(json.dumps({"type": "ping"}))
            first = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "config"}))
            await ws.send(json.dumps({"type": "ping"}))
            frames = [first]
            while frames[-1].get("type") != "pong" or len(frames) == 1:
                frames.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "stop"}))
            return frames

    frames = asyncio.run(scenario())
    assert frames[0]["type"] == "pong"
    assert [f["type"] for f in frames[1:]] == ["status", "status", "pong"]


def test_server_sends_websocket_pings(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(ws_ping_interval_seconds=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            (
                f"GET /api/v1/audio/stream/transcribe?token={server.api_key} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        deadline = time.monotonic() + 5
        opcodes = []
        while time.monotonic() < deadline and 0x9 not in opcodes:
            while len(rest) < 2:
                rest += sock.recv(4096)
            opcode, length = rest[0] & 0x0F, rest[1] & 0x7F
            while len(rest) < 2 + length:
                rest += sock.recv(4096)
            opcodes.append(opcode)
            rest = rest[2 + length :]
        assert 0x9 in opcodes, f"no ping frame within 5 s (got opcodes {opcodes})"


@pytest.mark.parametrize(("pong_deadline", "close_code"), [(0.0, 1000), (0.6, 1011)])
def test_a_client_ahead_of_the_server_is_not_taken_for_dead_unless_a_pong_deadline_is_set(
    make_server: Callable[..., RunningServer],
    clip: Callable[[str], np.ndarray],
    pong_deadline: float,
    close_code: int,
) -> None:
    """The server reads a fast sender at its own pace, so the client's pong waits behind audio not read yet:
    a pong deadline (off by default) cuts such a client off with 1011 and no error frame."""
    server = make_server(
        ws_ping_interval_seconds=0.2,
        ws_ping_timeout_seconds=pong_deadline,
        streaming={"max_audio_speed": 1.0, "audio_burst_seconds": 0.5},
    )
    result = server.stream(clip("short.wav"), speed=0)

    assert result.close_code == close_code, (result.close_reason, result.error)
    assert bool(result.of_type("final")) is (close_code == 1000)
