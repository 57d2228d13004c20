"""Abuse of the file API through the real server: decode bombs and lying headers, bodies sent without a
key or past the size limit, refused and failed files' minutes, clients that leave, and SIGTERM."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from streamscribe.engines import SAMPLE_RATE
from streamscribe.engines.base import AudioWindow, Transcript
from streamscribe.server import openai_api
from tests.conftest import DATA, TEST_KEY, RunningServer, free_port
from tests.server.test_replicas import RedisServer
from tests.server.ws_helpers import limits, new_key

TRANSCRIBE = "/v1/audio/transcriptions"


def flac_silence(seconds: float, rate: int = 16000) -> bytes:
    """A FLAC file of digital silence: about 640 KiB an hour, so a few MiB hold days of audio."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="flac") as output:
        stream = output.add_stream("flac", rate=rate)
        stream.layout = "mono"
        step = 65536
        zeros = np.zeros((1, step), dtype=np.int16)
        total = int(seconds * rate)
        for offset in range(0, total, step):
            frame = av.AudioFrame.from_ndarray(
                zeros[:, : min(step, total - offset)], format="s16", layout="mono"
            )
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return out.getvalue()


def claiming(flac: bytes, samples: int) -> bytes:
    """``flac`` with a STREAMINFO header that claims ``samples`` samples (the frames stay as they are)."""
    word = int.from_bytes(flac[18:26], "big")  # rate, channels, bits, and the 36-bit sample count
    word = (word & ~((1 << 36) - 1)) | samples
    return flac[:18] + word.to_bytes(8, "big") + flac[26:]


def post_file(server: RunningServer, data: bytes, key: str = TEST_KEY, **kwargs: Any) -> httpx.Response:
    return httpx.post(
        server.base_url + TRANSCRIBE,
        headers={"Authorization": f"Bearer {key}"},
        files={"file": ("audio.flac", data)},
        data={"model": "whisper-1"},
        timeout=kwargs.pop("timeout", 60),
        **kwargs,
    )


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    """(thread name, seconds) of every piece of audio the server decodes from an uploaded file."""
    pieces: list[tuple[str, float]] = []
    real = openai_api.iter_audio_file

    def counting(*args: Any, **kwargs: Any) -> Iterator[np.ndarray]:
        for chunk in real(*args, **kwargs):
            pieces.append((threading.current_thread().name, len(chunk) / SAMPLE_RATE))
            yield chunk

    monkeypatch.setattr(openai_api, "iter_audio_file", counting)
    return pieces


def multi_user(tmp_path: Path, minutes: float, **overrides: Any) -> dict[str, Any]:
    tiers = {"free": {"daily_minutes": minutes, "concurrent_streams": 1}}
    return {"auth_mode": "multi_user", "data_dir": tmp_path / "data", "tiers": tiers, **overrides}


@pytest.fixture(params=["local", "redis"])
def counted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Settings that keep the minutes in this process, or in a real Redis (its Lua scripts)."""
    if request.param == "local":
        yield {}
        return
    redis = RedisServer(free_port(), tmp_path)
    redis.start()
    yield {"shared_store": {"redis_url": redis.url}}
    redis.kill()


class _SlowEngine:
    """Takes ``seconds`` over every window and answers with its number; from window ``fail_from`` on it
    raises instead."""

    name = "whisper-slow"
    sample_rate = SAMPLE_RATE
    languages = frozenset({"en"})

    def __init__(self, seconds: float, fail_from: int | None = None) -> None:
        self._seconds = seconds
        self._fail_from = fail_from
        self.windows = 0

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        time.sleep(self._seconds)
        results = []
        for _ in batch:
            self.windows += 1
            if self._fail_from is not None and self.windows >= self._fail_from:
                raise RuntimeError("engine fell over")
            results.append(Transcript(f"window {self.windows}", "en"))
        return results


def with_engine(server: RunningServer, engine: _SlowEngine) -> RunningServer:
    server.app.state.runtime.registry.get = lambda *choice: engine
    return server


# Item 1: decode bombs.


def test_a_file_longer_than_the_minutes_left_is_refused_from_its_header_at_no_cost(
    make_server: Callable[..., RunningServer], tmp_path: Path, decoded: list[tuple[str, float]]
) -> None:
    server = make_server(**multi_user(tmp_path, minutes=2, preload=False))
    key = new_key(server, "alice", tier="free")
    response = post_file(server, flac_silence(180), key)  # three minutes, two left
    assert response.status_code == 429, response.text
    assert "quota_exceeded" in response.text and "120.0 s of today's quota are left" in response.text
    assert decoded == [], "refused from the header, before any decoding"
    assert limits(server, key)["remaining_minutes"] == 2.0, "a refused file charges nothing"


def test_a_decode_bomb_is_refused_from_its_header(
    make_server: Callable[..., RunningServer], decoded: list[tuple[str, float]]
) -> None:
    server = make_server(preload=False, max_upload_seconds=600)
    bomb = flac_silence(3600)
    assert len(bomb) < 1024 * 1024  # an hour of audio, far under the byte limit
    response = post_file(server, bomb)
    assert response.status_code == 413, response.text
    assert "longer than the limit of 600 seconds" in response.json()["error"]["message"]
    assert decoded == []


def test_a_header_that_understates_the_length_does_not_lift_the_quota(
    make_server: Callable[..., RunningServer],
    tmp_path: Path,
    decoded: list[tuple[str, float]],
    counted: dict[str, Any],
) -> None:
    server = make_server(**multi_user(tmp_path, minutes=1, preload=False, **counted))
    key = new_key(server, "alice", tier="free")
    lie = claiming(flac_silence(600), 10 * 16000)  # ten minutes of audio, "10 s" says the header
    response = post_file(server, lie, key)
    assert response.status_code == 429, response.text
    assert 60 <= sum(seconds for _, seconds in decoded) <= 70, "decoding stops where the minutes end"
    assert limits(server, key)["remaining_minutes"] == 1.0, "a refused file charges nothing"


def test_a_header_that_understates_the_length_does_not_lift_the_duration_limit(
    make_server: Callable[..., RunningServer], decoded: list[tuple[str, float]]
) -> None:
    server = make_server(preload=False, max_upload_seconds=60)
    response = post_file(server, claiming(flac_silence(600), 10 * 16000))
    assert response.status_code == 413, response.text
    assert 60 <= sum(seconds for _, seconds in decoded) <= 70, "decoding stops at the limit"


def test_files_are_decoded_on_threads_of_their_own(
    make_server: Callable[..., RunningServer], decoded: list[tuple[str, float]]
) -> None:
    server = make_server(preload=False)
    response = post_file(server, (DATA / "short.wav").read_bytes())
    assert response.status_code == 200, response.text
    assert decoded and {name.split("_")[0] for name, _ in decoded} == {"file-decode"}


def test_a_client_that_leaves_stops_its_file_and_pays_for_what_was_transcribed(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = make_server(**multi_user(tmp_path, minutes=10, preload=False))
    engine = _SlowEngine(0.3)
    with_engine(server, engine)
    key = new_key(server, "alice", tier="free")
    with pytest.raises(httpx.ReadTimeout):
        post_file(server, (DATA / "long.wav").read_bytes(), key, timeout=1.5)  # 78 s, about 20 windows
    time.sleep(1.5)
    windows = engine.windows
    time.sleep(1.5)
    assert engine.windows == windows < 12, "no window is decoded once the client has gone"
    used = limits(server, key)["used_today_minutes"] * 60
    assert 0 < used < 40, f"charged {used:.1f} s: what was transcribed, not the 78 s file"


# Item 3: bodies without a key, or too large.


def _chunked_form(total: int, sent: list[int]) -> Iterator[bytes]:
    """A multipart form whose file part is ``total`` zero bytes, sent in chunks (no Content-Length);
    ``sent`` gets the size of each chunk as it is handed to the socket."""
    yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.flac"\r\n\r\n'
    chunk = bytes(256 * 1024)
    for _ in range(total // len(chunk)):
        sent.append(len(chunk))
        yield chunk
    yield b"\r\n--b--\r\n"


@pytest.mark.parametrize("key", [None, "wrong-key-" + "x" * 30, TEST_KEY])
def test_a_chunked_upload_is_refused_before_its_body_is_read(
    make_server: Callable[..., RunningServer], key: str | None
) -> None:
    server = make_server(preload=False, max_upload_bytes=1024 * 1024)
    sent: list[int] = []
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    if key:
        headers["X-API-KEY"] = key
    started = time.monotonic()
    response = httpx.post(
        server.base_url + TRANSCRIBE,
        content=_chunked_form(80 * 1024 * 1024, sent),
        headers=headers,
        timeout=30,
    )
    assert response.status_code == (413 if key == TEST_KEY else 401), response.text
    # What sits in socket buffers gets through before the refusal lands: a few MiB, never the 80.
    assert sum(sent) < 16 * 1024 * 1024, f"{sum(sent) >> 20} MiB were sent before the answer"
    assert time.monotonic() - started < 5
    assert response.headers["connection"] == "close", "the rest of the body is never read"
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200


# Item 11: refused and failed files.


def test_an_engine_failure_gives_back_what_was_not_transcribed(
    make_server: Callable[..., RunningServer], tmp_path: Path, counted: dict[str, Any]
) -> None:
    server = make_server(**multi_user(tmp_path, minutes=10, preload=False, **counted))
    with_engine(server, _SlowEngine(0.0, fail_from=3))
    key = new_key(server, "alice", tier="free")
    response = post_file(server, (DATA / "long.wav").read_bytes(), key)
    assert response.status_code == 500 and "internal_error" in response.text
    used = limits(server, key)["used_today_minutes"] * 60
    assert 0 < used < 20, f"charged {used:.1f} s: the two windows transcribed, not the 78 s file"


# Item 12: SIGTERM.


def test_sigterm_finishes_a_running_upload_and_refuses_new_ones(
    make_server: Callable[..., RunningServer],
) -> None:
    server = with_engine(make_server(preload=False, shutdown_grace_seconds=20), _SlowEngine(0.35))
    engine: _SlowEngine = server.app.state.runtime.registry.get()
    results: list[httpx.Response] = []
    upload = threading.Thread(
        target=lambda: results.append(post_file(server, (DATA / "long.wav").read_bytes()))
    )
    with httpx.Client(base_url=server.base_url, headers={"X-API-KEY": TEST_KEY}) as idle:
        assert idle.get("/v1/models").status_code == 200  # a kept-alive connection, open through the drain
        upload.start()
        while engine.windows == 0:
            time.sleep(0.05)
        server._server.should_exit = True  # what uvicorn does on SIGTERM
        time.sleep(0.3)
        refused = idle.post(TRANSCRIBE, files={"file": ("a.wav", (DATA / "short.wav").read_bytes())})
    assert refused.status_code == 503 and "shutting down" in refused.text
    upload.join(timeout=30)
    (response,) = results
    assert response.status_code == 200, response.text
    assert engine.windows > 15 and f"window {engine.windows}" in response.json()["text"], (
        "the upload was finished, not cut after 5 s"
    )
