"""Multi-user mode through a real server and socket: keys from a real SQLite file, tiers, quotas, the limits
endpoint, access rules, and no key in any log line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import stat
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamscribe.client import StreamResult, encode_samples, stream_audio
from streamscribe.config import Settings
from streamscribe.server.auth import KeyHasher, create_key, load_pepper
from streamscribe.server.quotas import utc_day
from streamscribe.server.store import MIGRATIONS, KeyStore, open_store
from tests.conftest import RunningServer, write_lock_held_elsewhere
from tests.server.ws_helpers import limits, new_key, open_stream, refused

LIMITS_FIELDS = {
    "user_id",
    "tier",
    "limits",
    "used_today_minutes",
    "remaining_minutes",
    "active_streams",
    "can_start_stream",
}
SILENCE = np.zeros(16000, dtype=np.float32)  # one second; silence keeps the engine idle


def multi_user(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A multi-user server's settings, database under ``tmp_path``; free tier: 1 stream, 0.05 minutes."""
    settings: dict[str, Any] = {
        "auth_mode": "multi_user",
        "data_dir": tmp_path / "data",
        "tiers": {"free": {"daily_minutes": 0.05, "concurrent_streams": 1}},
    }
    return settings | overrides


@pytest.fixture
def mu_server(make_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    return make_server(**multi_user(tmp_path))


def test_store_keeps_hashes_only_and_migrates_once(tmp_path: Path) -> None:
    settings = Settings(**multi_user(tmp_path))
    store = open_store(settings)
    key = create_key(store, KeyHasher(load_pepper(settings)), "alice", tier="standard").key
    assert store.schema_version == len(MIGRATIONS)
    store.close()

    reopened = KeyStore(f"sqlite:///{tmp_path / 'data' / 'streamscribe.db'}")
    assert reopened.schema_version == len(MIGRATIONS)
    [record] = reopened.list_keys()
    assert (record.user_id, record.tier, record.scope) == ("alice", "standard", "stream")
    reopened.close()
    secret = key.split("_", 2)[2].encode()
    database = tmp_path / "data" / "streamscribe.db"
    assert all(secret not in path.read_bytes() for path in database.parent.iterdir())
    rows = sqlite3.connect(database).execute("SELECT version FROM schema_version").fetchall()
    assert rows == [(len(MIGRATIONS),)]


def test_the_data_folder_is_the_servers_alone_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # a common default: others could read what it creates
    try:
        settings = Settings(**multi_user(tmp_path))
        store = open_store(settings)
        create_key(store, KeyHasher(load_pepper(settings)), "alice")
        store.close()
    finally:
        os.umask(previous)
    folder = tmp_path / "data"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.iterdir():  # the database, its -wal and -shm files, the key pepper
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_wrong_revoked_and_expired_keys_are_refused(mu_server: RunningServer) -> None:
    good = new_key(mu_server, "alice")
    expired = new_key(mu_server, "bob", expires_at=time.time() - 1)
    revoked = new_key(mu_server, "carol")
    store = open_store(mu_server.settings)
    [carol_key] = store.list_keys("carol")
    assert store.revoke_key(carol_key.key_id)
    store.close()
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")

    for key in ("not-a-key", tampered, expired, revoked, mu_server.api_key):
        result = mu_server.stream(SILENCE, token=key, speed=0)
        assert result.close_code == 4401, key
        assert result.error is not None and result.error["error_type"] == "auth_failed"
    assert mu_server.stream(SILENCE, token=good, speed=0).close_code == 1000


def test_key_accepted_as_query_header_bearer_and_auth_message(mu_server: RunningServer) -> None:
    key = new_key(mu_server, "alice", tier="standard")
    url = mu_server.ws_url("")

    async def configured(headers: dict[str, str] | None, first: dict[str, Any] | None) -> str:
        async with connect(url, additional_headers=headers) as ws:
            if first:
                await ws.send(json.dumps(first))
            await ws.send(json.dumps({"type": "config"}))
            return str(json.loads(await ws.recv())["state"])

    assert mu_server.stream(SILENCE, token=key, speed=0).close_code == 1000
    assert asyncio.run(configured({"X-API-KEY": key}, None)) == "configured"
    assert asyncio.run(configured({"Authorization": f"Bearer {key}"}, None)) == "configured"
    assert asyncio.run(configured(None, {"type": "auth", "token": key})) == "configured"


def test_query_token_can_be_disabled(make_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    running = make_server(**multi_user(tmp_path, access={"allow_query_token": False}))
    key = new_key(running, "alice")
    code, error = asyncio.run(refused(running.ws_url(key)))
    assert code == 4401 and error is not None and "header" in error["message"]
    by_header = stream_audio(running.ws_url(""), SILENCE, 16000, speed=0, headers={"X-API-KEY": key})
    assert asyncio.run(by_header).close_code == 1000


def test_missing_key_waits_for_the_auth_message_then_closes_4401(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    running = make_server(**multi_user(tmp_path, access={"auth_message_timeout_seconds": 0.3}, preload=False))

    async def silent_client() -> int | None:
        async with connect(running.ws_url("")) as ws:
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
        return ws.close_code

    started = time.monotonic()
    assert asyncio.run(silent_client()) == 4401
    assert time.monotonic() - started < 3


def test_limits_only_key_may_not_stream(mu_server: RunningServer) -> None:
    key = new_key(mu_server, "dashboard", scope="limits")
    code, error = asyncio.run(refused(mu_server.ws_url(key)))
    assert code == 4403 and error is not None and error["error_type"] == "forbidden"
    report = limits(mu_server, key)
    assert report["user_id"] == "dashboard" and report["can_start_stream"] is False


def test_limits_only_key_may_not_use_the_file_api(mu_server: RunningServer) -> None:
    """Scope is checked on every HTTP route that does work, not only on the WebSocket (issue 16, item 5)."""
    key = new_key(mu_server, "dashboard", scope="limits")
    headers = {"Authorization": f"Bearer {key}"}
    models = httpx.get(f"{mu_server.base_url}/v1/models", headers=headers)
    assert models.status_code == 403 and models.json()["error"]["code"] == "forbidden"
    upload = httpx.post(
        f"{mu_server.base_url}/v1/audio/transcriptions",
        headers=headers,
        files={"file": ("silence.wav", _wav_bytes(SILENCE), "audio/wav")},
        data={"model": "whisper-1"},
    )
    assert upload.status_code == 403 and upload.json()["error"]["code"] == "forbidden"
    assert limits(mu_server, key)["used_today_minutes"] == 0
    stream_key = new_key(mu_server, "alice")
    allowed = httpx.get(f"{mu_server.base_url}/v1/models", headers={"X-API-KEY": stream_key})
    assert allowed.status_code == 200


def _wav_bytes(samples: np.ndarray) -> bytes:
    import io
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes((samples * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def test_ip_allowlist(make_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    outside = make_server(**multi_user(tmp_path, access={"ip_allowlist": ["10.0.0.0/8", "192.168.1.7"]}))
    key = new_key(outside, "alice")
    code, error = asyncio.run(refused(outside.ws_url(key)))
    assert code == 1008 and error is not None and error["error_type"] == "forbidden"
    response = httpx.get(f"{outside.base_url}/api/v1/audio/stream/limits", headers={"X-API-KEY": key})
    assert response.status_code == 403

    inside = make_server(**multi_user(tmp_path, access={"ip_allowlist": ["127.0.0.0/8"]}))
    assert inside.stream(SILENCE, token=key, speed=0).close_code == 1000


def test_connection_attempts_are_rate_limited_per_key_and_per_address(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    running = make_server(
        **multi_user(
            tmp_path,
            preload=False,
            access={"connections_per_minute_per_key": 2, "connections_per_minute_per_ip": 5},
        )
    )
    key = new_key(running, "alice", tier="premium")
    other = new_key(running, "bob", tier="premium")
    hello = {"type": "reset"}  # any first message: these connections are refused or dropped right away
    for _ in range(2):
        asyncio.run(refused(running.ws_url(key), hello))
    code, error = asyncio.run(refused(running.ws_url(key), hello))
    assert code == 4429 and error is not None and error["error_type"] == "rate_limited"
    assert "with this key" in error["message"]
    # bob's key is fine, until this address has made five attempts in the minute.
    asyncio.run(refused(running.ws_url(other), hello))
    asyncio.run(refused(running.ws_url(other), hello))
    code, error = asyncio.run(refused(running.ws_url(other), hello))
    assert code == 4429 and error is not None and "from this address" in error["message"]


def test_idle_stream_is_closed_1001(make_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    running = make_server(**multi_user(tmp_path, access={"idle_timeout_seconds": 0.5}))
    key = new_key(running, "alice")

    async def idle() -> tuple[int | None, list[dict[str, Any]]]:
        frames = []
        async with connect(running.ws_url(key)) as ws:
            await ws.send(json.dumps({"type": "config"}))
            with pytest.raises(ConnectionClosed):
                while True:
                    frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        return ws.close_code, frames

    code, frames = asyncio.run(idle())
    assert code == 1001
    assert frames[-1]["type"] == "error" and frames[-1]["error_type"] == "timeout"


def test_free_tier_allows_one_stream_at_a_time(mu_server: RunningServer) -> None:
    key = new_key(mu_server, "alice")

    async def scenario() -> None:
        first = await open_stream(mu_server.ws_url(key))
        code, error = await refused(mu_server.ws_url(key))
        assert code == 4003
        assert error is not None and error["error_type"] == "quota_exceeded"
        assert error["quota"] == "concurrent_streams"
        await first.close()
        await asyncio.sleep(0.2)
        second = await open_stream(mu_server.ws_url(key))
        await second.close()

    asyncio.run(scenario())


def test_a_tier_the_server_does_not_know_gets_the_free_tiers_limits(mu_server: RunningServer) -> None:
    key = new_key(mu_server, "dora", tier="premium")
    store = open_store(mu_server.settings)
    try:
        assert store.set_tier("dora", "gold")  # a hand-edited database, or one a newer release wrote
    finally:
        store.close()
    report = limits(mu_server, key)
    assert report["tier"] == "gold"
    assert report["limits"]["concurrent_streams"] == 1  # the free tier's, not premium's

    async def scenario() -> None:
        first = await open_stream(mu_server.ws_url(key))
        code, _ = await refused(mu_server.ws_url(key))
        assert code == 4003
        await first.close()

    asyncio.run(scenario())


def test_standard_tier_allows_three_streams(mu_server: RunningServer) -> None:
    key = new_key(mu_server, "alice", tier="standard")

    async def scenario() -> None:
        streams = [await open_stream(mu_server.ws_url(key)) for _ in range(3)]
        code, error = await refused(mu_server.ws_url(key))
        assert code == 4003 and error is not None and error["quota"] == "concurrent_streams"
        for ws in streams:
            await ws.close()

    asyncio.run(scenario())


def test_daily_minutes_are_charged_and_enforced(mu_server: RunningServer) -> None:
    key = new_key(mu_server, "alice")  # free tier here: 0.05 minutes = 3 s a day
    first = mu_server.stream(np.zeros(32000, dtype=np.float32), token=key, speed=0)
    assert first.close_code == 1000
    report = limits(mu_server, key)
    assert report["used_today_minutes"] == pytest.approx(2 / 60, abs=1e-3)
    assert report["remaining_minutes"] == pytest.approx(0.05 - 2 / 60, abs=1e-3)

    over: StreamResult = mu_server.stream(np.zeros(32000, dtype=np.float32), token=key, speed=0)
    assert over.close_code == 4003
    assert over.error is not None and over.error["quota"] == "daily_minutes"
    assert limits(mu_server, key)["used_today_minutes"] == pytest.approx(3 / 60, abs=2e-3)

    code, error = asyncio.run(refused(mu_server.ws_url(key)))
    assert code == 4003 and error is not None and error["quota"] == "daily_minutes"
    assert limits(mu_server, key)["can_start_stream"] is False


def test_limits_endpoint_schema_and_values(mu_server: RunningServer) -> None:
    key = new_key(mu_server, "alice", tier="standard")
    before = limits(mu_server, key)
    assert set(before) == LIMITS_FIELDS
    assert set(before["limits"]) == {"daily_minutes", "concurrent_streams", "max_frame_bytes"}
    assert before == {
        "user_id": "alice",
        "tier": "standard",
        "limits": {"daily_minutes": 300.0, "concurrent_streams": 3, "max_frame_bytes": 1_048_576},
        "used_today_minutes": 0.0,
        "remaining_minutes": 300.0,
        "active_streams": 0,
        "can_start_stream": True,
    }
    assert mu_server.stream(np.zeros(48000, dtype=np.float32), token=key, speed=0).close_code == 1000
    after = limits(mu_server, key)
    assert after["used_today_minutes"] == pytest.approx(0.05, abs=1e-4)
    assert after["remaining_minutes"] == pytest.approx(299.95, abs=1e-4)

    async def while_streaming() -> dict[str, Any]:
        ws = await open_stream(mu_server.ws_url(key))
        report = await asyncio.to_thread(limits, mu_server, key)
        await ws.close()
        return report

    assert asyncio.run(while_streaming())["active_streams"] == 1
    premium = limits(mu_server, new_key(mu_server, "bob", tier="premium"))
    assert premium["remaining_minutes"] is None and premium["limits"]["daily_minutes"] is None
    by_query = httpx.get(f"{mu_server.base_url}/api/v1/audio/stream/limits", params={"token": key})
    assert by_query.status_code == 200
    unauthorized = httpx.get(f"{mu_server.base_url}/api/v1/audio/stream/limits", params={"token": "nope"})
    assert unauthorized.status_code == 401 and unauthorized.json()["error_type"] == "auth_failed"


def test_minutes_survive_a_restart(make_server: Callable[..., RunningServer], tmp_path: Path) -> None:
    first = make_server(**multi_user(tmp_path, usage_flush_seconds=3600))
    key = new_key(first, "alice", tier="standard")
    assert first.stream(np.zeros(24000, dtype=np.float32), token=key, speed=0).close_code == 1000
    first.stop()
    second = make_server(**multi_user(tmp_path, preload=False))
    assert limits(second, key)["used_today_minutes"] == pytest.approx(1.5 / 60, abs=1e-4)


def test_a_locked_database_does_not_hold_up_keys_or_limits(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    running = make_server(**multi_user(tmp_path, usage_flush_seconds=0.2))
    key = new_key(running, "alice", tier="standard")
    one_second = json.dumps({"type": "audio", "data": encode_samples(SILENCE)})

    async def scenario() -> tuple[float, float, dict[str, Any]]:
        ws = await open_stream(running.ws_url(key))
        with write_lock_held_elsewhere(tmp_path / "data" / "streamscribe.db"):
            await ws.send(one_second)
            await asyncio.sleep(0.6)  # charged: the usage flusher is now waiting for the lock, in a loop
            started = time.monotonic()
            second = await open_stream(running.ws_url(key))
            opened = time.monotonic() - started
            started = time.monotonic()
            report = await asyncio.to_thread(limits, running, key)
            answered = time.monotonic() - started
        await second.close()
        await ws.close()
        return opened, answered, report

    opened, answered, report = asyncio.run(scenario())
    assert opened < 0.5, f"a new stream took {opened:.2f} s to authenticate"
    assert answered < 0.5, f"/limits took {answered:.2f} s"
    assert report["used_today_minutes"] == pytest.approx(1 / 60, abs=1e-4)
    # The flusher kept the seconds it could not write, and wrote them once the lock was gone.
    store = open_store(running.settings)
    deadline = time.monotonic() + 5
    while store.usage_seconds("alice", utc_day(time.time())) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.usage_seconds("alice", utc_day(time.time())) == pytest.approx(1.0)
    store.close()


def test_single_user_mode_keeps_its_key_and_reports_unlimited_limits(server: RunningServer) -> None:
    report = limits(server, server.api_key)
    assert set(report) == LIMITS_FIELDS
    assert report["tier"] == "single_user" and report["remaining_minutes"] is None
    assert report["limits"]["concurrent_streams"] is None
    assert server.stream(SILENCE, speed=0).close_code == 1000
    assert server.stream(SILENCE, speed=0, token="wrong").close_code == 4401


def test_no_key_in_any_log_line(
    make_server: Callable[..., RunningServer], tmp_path: Path, captured_logs: list[str]
) -> None:
    running = make_server(**multi_user(tmp_path, access={"connections_per_minute_per_key": 3}))
    key = new_key(running, "alice", tier="standard")
    revoked = new_key(running, "alice")
    store = open_store(running.settings)
    store.revoke_key(store.list_keys("alice")[1].key_id)
    store.close()
    running.stream(SILENCE, token=key, speed=0)
    running.stream(SILENCE, token=revoked, speed=0)
    running.stream(SILENCE, token=key + "x", speed=0)
    limits(running, key)
    # urllib, not httpx: httpx itself logs request URLs (client side), and this is about the server's logs.
    with urllib.request.urlopen(f"{running.base_url}/api/v1/audio/stream/limits?token={key}") as response:
        assert response.status == 200
    for _ in range(3):  # past the per-key rate limit
        running.stream(SILENCE, token=key, speed=0)
    running.stop()
    assert any("/api/v1/audio/stream" in line for line in captured_logs), "no access log captured"
    for secret in (key, revoked, key.split("_", 2)[2], revoked.split("_", 2)[2]):
        assert not [line for line in captured_logs if secret in line]


Frames = list[dict[str, Any]]


async def _stream_until_closed(
    ws: ClientConnection, speech: np.ndarray, then: Callable[[], None] | None = None
) -> tuple[Frames, float]:
    """Send ``speech`` in real time (then call ``then``), then pings, until the server closes (10 s at
    most): its frames, and when it closed."""
    frames: Frames = []

    async def send() -> None:
        with contextlib.suppress(ConnectionClosed):
            for start in range(0, len(speech), 1600):
                data = encode_samples(speech[start : start + 1600])
                await ws.send(json.dumps({"type": "audio", "data": data}))
                await asyncio.sleep(0.1)
            if then is not None:
                then()
            while True:  # pings alone used to keep a stream open
                await ws.send(json.dumps({"type": "ping"}))
                await asyncio.sleep(0.2)

    sender = asyncio.create_task(send())
    with contextlib.suppress(ConnectionClosed, TimeoutError):
        async with asyncio.timeout(10):
            async for raw in ws:
                frames.append(json.loads(raw))
    sender.cancel()
    return frames, time.time()


def test_open_streams_end_when_their_key_is_revoked_or_expires(
    make_server: Callable[..., RunningServer], tmp_path: Path, clip: Callable[[str], np.ndarray]
) -> None:
    # Slots refreshed (and keys re-checked) every 0.5 s.
    running = make_server(**multi_user(tmp_path, shared_store={"stream_ttl_seconds": 1.5}))
    revoked = new_key(running, "alice", tier="standard")
    expires_at = time.time() + 4
    expiring = new_key(running, "bob", tier="standard", expires_at=expires_at)
    speech = clip("short.wav")[: int(16000 * 1.6)]  # the utterance is still open when the key is revoked
    revoked_at: list[float] = []

    def revoke() -> None:
        store = open_store(running.settings)  # as `streamscribe keys revoke` does, from outside the server
        assert store.revoke_key(store.list_keys("alice")[0].key_id)
        store.close()
        revoked_at.append(time.time())

    async def scenario() -> list[tuple[ClientConnection, Frames, float]]:
        alice = await open_stream(running.ws_url(revoked))
        bob = await open_stream(running.ws_url(expiring))
        (alice_frames, alice_closed), (bob_frames, bob_closed) = await asyncio.gather(
            _stream_until_closed(alice, speech, then=revoke), _stream_until_closed(bob, speech[:1600])
        )
        return [
            (alice, alice_frames, alice_closed - revoked_at[0]),
            (bob, bob_frames, bob_closed - expires_at),
        ]

    streams = asyncio.run(scenario())
    for ws, frames, closed_after in streams:
        assert ws.close_code == 4401, frames[-3:]
        assert frames[-1]["type"] == "error" and frames[-1]["error_type"] == "auth_failed"
        assert 0 <= closed_after < 4
    # The revoked stream's open utterance got its final before the error.
    kinds = [frame["type"] for frame in streams[0][1]]
    assert "final" in kinds and kinds.index("final") < kinds.index("error"), kinds
