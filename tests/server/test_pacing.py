"""A stream that sends faster than it may is read more slowly: other streams on the server do not wait for
it (real server, real sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect

from streamscribe.client import encode_samples
from tests.conftest import RunningServer
from tests.server.test_observability import scrape
from tests.server.ws_helpers import worst_pong

FLOOD_SECONDS = 3.0


async def _ready_stream(url: str) -> ClientConnection:
    ws = await connect(url, max_size=None)
    await ws.send(json.dumps({"type": "config"}))
    while json.loads(await ws.recv()).get("state") != "ready":
        pass
    return ws


def _flood(url: str, frame: str | bytes, ready: threading.Event, seconds: float) -> int:
    """Send ``frame`` on a ready stream for ``seconds``, from a thread of its own (a loop that never waits
    would starve the pinging client's loop, not the server's); the frames sent."""

    async def flood() -> int:
        ws = await _ready_stream(url)
        ready.set()
        sent = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    await ws.send(frame)  # waits while the server does not read (TCP backpressure)
                    sent += 1
        ws.transport.abort()
        return sent

    return asyncio.run(flood())


# 1 MiB frames of silence (16 s of audio each; tiny once compressed), frames of one sample, and the 1 MiB
# frames as binary frames (no base64, no JSON).
FLOODS: dict[str, str | bytes] = {
    "large_silent_frames": encode_samples(np.zeros(262_144, dtype=np.float32)),
    "tiny_frames": encode_samples(np.zeros(1, dtype=np.float32)),
    "large_binary_frames": np.zeros(262_144, dtype="<f4").tobytes(),
}


@pytest.mark.parametrize("flood", FLOODS)
def test_another_streams_pings_are_answered_while_one_floods(
    make_server: Callable[..., RunningServer], flood: str
) -> None:
    running = make_server()
    payload = FLOODS[flood]
    frame = payload if isinstance(payload, bytes) else json.dumps({"type": "audio", "data": payload})

    async def scenario() -> tuple[float, int]:
        quiet = await _ready_stream(running.ws_url())
        ready = threading.Event()
        flooding = asyncio.create_task(
            asyncio.to_thread(_flood, running.ws_url(), frame, ready, FLOOD_SECONDS)
        )
        await asyncio.to_thread(ready.wait, 30)
        worst, _ = await worst_pong(quiet, FLOOD_SECONDS)
        sent = await flooding
        await quiet.close()
        return worst, sent

    started = time.monotonic()
    worst, sent = asyncio.run(scenario())
    received = scrape(running)['streamscribe_audio_seconds_total{source="stream"}']
    print(f"{flood}: {sent} frames sent, {received:.0f} s of audio read, worst pong {worst:.3f} s")
    assert worst < 0.5
    # The flooder's audio was read at its budget: a burst, then 4 times real time (one frame over).
    streaming = running.settings.streaming
    budget = streaming.audio_burst_seconds + streaming.max_audio_speed * (time.monotonic() - started)
    assert received <= budget + 16.4
