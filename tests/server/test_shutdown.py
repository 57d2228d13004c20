"""A real ``streamscribe serve`` process: SIGTERM drains streams gracefully; its logs are JSON lines."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamscribe.client import encode_samples
from tests.conftest import TEST_KEY, ServerProcess, normalize_text


def test_sigterm_lets_the_current_utterance_finish_then_closes_1001(
    server_process: Callable[..., ServerProcess], clip: Callable[[str], np.ndarray]
) -> None:
    server = server_process(STREAMSCRIBE_SHUTDOWN_GRACE_SECONDS="12")
    speech = clip("long.wav")
    url = f"ws://127.0.0.1:{server.port}/api/v1/audio/stream/transcribe?token={TEST_KEY}"

    async def scenario() -> tuple[list[dict[str, Any]], int | None, float, float]:
        frames: list[dict[str, Any]] = []
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "config"}))

            async def send_in_real_time() -> None:
                start = time.monotonic()
                for index, offset in enumerate(range(0, len(speech), 1600)):
                    await asyncio.sleep(max(0.0, start + index * 0.1 - time.monotonic()))
                    if index == 15:  # 1.5 s in: mid-way through "Please send the quarterly report..."
                        server.process.send_signal(signal.SIGTERM)
                    chunk = encode_samples(speech[offset : offset + 1600])
                    try:
                        await ws.send(json.dumps({"type": "audio", "data": chunk}))
                    except ConnectionClosed:
                        return

            sender = asyncio.create_task(send_in_real_time())
            try:
                async for raw in ws:
                    frames.append(json.loads(raw))
            except ConnectionClosed:
                pass
            closed_at = time.monotonic()
            sender.cancel()
            return frames, ws.close_code, closed_at, time.monotonic()

    started = time.monotonic()
    frames, code, closed_at, _ = asyncio.run(scenario())

    assert code == 1001
    kinds = [f["type"] for f in frames]
    assert kinds[-1] == "full_transcript"
    finals = [f for f in frames if f["type"] == "final"]
    assert len(finals) == 1, "the utterance under way was finished; no new one was started"
    assert "by friday" in normalize_text(finals[0]["text"]), (
        "the whole utterance, not what was sent by SIGTERM"
    )
    assert frames[-1]["text"] == finals[0]["text"]
    assert closed_at - started < 12
    server.process.wait(timeout=15)
    assert server.process.returncode == 0, "the drain finished: a clean exit, not 'killed by SIGTERM'"
    assert "Application shutdown complete." in server.log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=1)


def test_sigterm_with_idle_streams_exits_quickly(server_process: Callable[..., ServerProcess]) -> None:
    server = server_process(STREAMSCRIBE_SHUTDOWN_GRACE_SECONDS="20")
    url = f"ws://127.0.0.1:{server.port}/api/v1/audio/stream/transcribe?token={TEST_KEY}"

    async def scenario() -> tuple[list[dict[str, Any]], int | None, int | None]:
        async with connect(url) as configured, connect(url) as unconfigured:
            await configured.send(json.dumps({"type": "config"}))
            await configured.recv()
            await configured.recv()
            server.process.send_signal(signal.SIGTERM)
            frames = [json.loads(raw) async for raw in configured]
            async for _ in unconfigured:
                pass
            return frames, configured.close_code, unconfigured.close_code

    started = time.monotonic()
    frames, code, unconfigured_code = asyncio.run(scenario())
    assert server.process.wait(timeout=10) == 0
    assert code == 1001 and [(f["type"], f["text"]) for f in frames] == [("full_transcript", "")]
    assert unconfigured_code == 1001, "a client still to send its config is not waited for"
    assert time.monotonic() - started < 5, "no utterance open: nothing to wait for"


def test_logs_are_json_lines_with_ids_and_no_key(
    server_process: Callable[..., ServerProcess], clip: Callable[[str], np.ndarray]
) -> None:
    from streamscribe.client import stream_audio

    server = server_process()
    url = f"ws://127.0.0.1:{server.port}/api/v1/audio/stream/transcribe?token={TEST_KEY}"
    asyncio.run(stream_audio(url, clip("short.wav"), 16000, speed=0))
    httpx.get(f"http://127.0.0.1:{server.port}/v1/models", headers={"Authorization": f"Bearer {TEST_KEY}"})
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=15)

    lines = server.log_lines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in events)
    by_event = {e.get("event"): e for e in events}
    assert by_event["stream_start"]["request_id"].startswith("ws-")
    assert by_event["stream_end"]["request_id"] == by_event["stream_start"]["request_id"]
    assert by_event["stream_end"]["audio_seconds"] > 3
    assert by_event["http_request"]["request_id"].startswith("http-")
    assert not [line for line in lines if TEST_KEY in line]
