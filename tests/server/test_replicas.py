"""Several replicas sharing one Redis: real ``streamscribe serve`` processes on loopback ports, a real
redis-server (the Debian package; scripts/test.sh installs it), one SQLite key database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamscribe.client import encode_samples, stream_audio, stream_url
from streamscribe.config import Settings
from streamscribe.server.quotas import utc_day
from streamscribe.server.store import open_store
from tests.conftest import free_port
from tests.server.ws_helpers import limits, new_key, open_stream, refused, worst_pong

STREAM_TTL_SECONDS = 1.5


@dataclass
class RedisServer:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            pytest.fail("redis-server is not installed: run scripts/test.sh (it installs the Debian package)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


@dataclass
class Replica:
    """One ``streamscribe serve`` process."""

    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] = field(init=False)

    @property
    def settings(self) -> Settings:
        # The process's database and pepper, found the way the process finds them.
        return Settings(auth_mode="multi_user", data_dir=Path(self.env["STREAMSCRIBE_DATA_DIR"]))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, key: str) -> str:
        return stream_url(f"ws://127.0.0.1:{self.port}", key)

    def start(self) -> None:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamscribe.cli", "serve", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("replica did not start")
            time.sleep(0.1)

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.base_url}/api/v1/audio/stream/status").json()  # type: ignore[no-any-return]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start_replicas(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[..., list[Replica]]]:
    """Start server processes sharing ``redis_server`` and one data folder; each takes settings overrides
    as environment variables (``on_failure="fail_open"``...)."""
    started: list[Replica] = []

    def start(*overrides: dict[str, str]) -> list[Replica]:
        replicas = []
        for index, extra in enumerate(overrides):
            env = {
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "STREAMSCRIBE_AUTH_MODE": "multi_user",
                "STREAMSCRIBE_DATA_DIR": str(tmp_path / "data"),
                "STREAMSCRIBE_CACHE_DIR": str(tmp_path / "cache"),
                "STREAMSCRIBE_SHARED_STORE__REDIS_URL": redis_server.url,
                "STREAMSCRIBE_SHARED_STORE__STREAM_TTL_SECONDS": str(STREAM_TTL_SECONDS),
                "STREAMSCRIBE_TIERS__FREE__DAILY_MINUTES": "0.1",
                **extra,
            }
            replica = Replica(free_port(), env, tmp_path / f"replica-{len(started) + index}.log")
            replicas.append(replica)
        for replica in replicas:  # start together, wait together: model loading overlaps
            replica.start()
        started.extend(replicas)
        for replica in replicas:
            replica.wait_ready()
        return replicas

    yield start
    for replica in started:
        replica.stop()
    keys_logged = [line for replica in started for line in replica.log().splitlines() if "ssk_" in line]
    assert not keys_logged, keys_logged


def test_one_users_stream_limit_holds_across_replicas(start_replicas: Callable[..., list[Replica]]) -> None:
    a, b = start_replicas({}, {})
    key = new_key(a, "alice")  # free tier: one stream at a time

    async def scenario() -> None:
        first = await open_stream(a.ws_url(key))
        code, error = await refused(b.ws_url(key))
        assert code == 4003
        assert error is not None and error["error_type"] == "quota_exceeded"
        assert error["quota"] == "concurrent_streams"
        assert (await asyncio.to_thread(limits, b, key))["active_streams"] == 1
        # Killing the stream (the connection drops, no close handshake) frees the slot at once: well
        # before the slot's TTL would (a loaded machine may take a moment to see the drop).
        first.transport.abort()
        deadline = time.monotonic() + STREAM_TTL_SECONDS * 2 / 3
        while (await asyncio.to_thread(limits, b, key))["active_streams"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        second = await open_stream(b.ws_url(key))
        code, _ = await refused(a.ws_url(key))
        assert code == 4003
        await second.close()

    asyncio.run(scenario())


def test_minutes_add_up_across_replicas(start_replicas: Callable[..., list[Replica]]) -> None:
    a, b = start_replicas({}, {})
    key = new_key(a, "alice")  # free tier here: 0.1 minute = 6 s a day
    silence = np.zeros(16000 * 2, dtype=np.float32)
    for replica in (a, b):
        result = asyncio.run(stream_audio(replica.ws_url(key), silence, 16000, speed=0))
        assert result.close_code == 1000
    for replica in (a, b):
        assert limits(replica, key)["used_today_minutes"] == pytest.approx(4 / 60, abs=1e-4)
    over = asyncio.run(stream_audio(b.ws_url(key), np.zeros(16000 * 3, dtype=np.float32), 16000, speed=0))
    assert over.close_code == 4003
    assert over.error is not None and over.error["quota"] == "daily_minutes"
    code, error = asyncio.run(refused(a.ws_url(key)))
    assert code == 4003 and error is not None and error["quota"] == "daily_minutes"


def test_a_crashed_replicas_streams_free_their_slots_after_the_ttl(
    start_replicas: Callable[..., list[Replica]],
) -> None:
    a, b = start_replicas({}, {})
    key = new_key(a, "alice")

    async def scenario() -> float:
        held = await open_stream(a.ws_url(key))
        a.stop(signal.SIGKILL)  # no clean-up: only the TTL can free the slot
        held.transport.abort()
        killed = time.monotonic()
        code, _ = await refused(b.ws_url(key))
        assert code == 4003
        while True:
            code, _ = await refused(b.ws_url(key), first={"type": "reset"})
            if code != 4003:
                return time.monotonic() - killed
            assert time.monotonic() - killed < STREAM_TTL_SECONDS + 3
            await asyncio.sleep(0.2)

    freed_after = asyncio.run(scenario())
    assert freed_after <= STREAM_TTL_SECONDS + 1


def test_redis_outage_fail_closed_and_fail_open(
    start_replicas: Callable[..., list[Replica]], redis_server: RedisServer
) -> None:
    policy = "STREAMSCRIBE_SHARED_STORE__ON_FAILURE"
    closed, open_ = start_replicas(
        {policy: "fail_closed"},
        {policy: "fail_open", "STREAMSCRIBE_SHARED_STORE__FAIL_OPEN_STREAMS": "1"},
    )
    alice = new_key(closed, "alice", tier="standard")
    bob = new_key(closed, "bob", tier="standard")
    silence = json.dumps({"type": "audio", "data": encode_samples(np.zeros(1600, dtype=np.float32))})

    async def scenario() -> None:
        running = await open_stream(closed.ws_url(alice))
        assert json.loads(await running.recv())["state"] == "ready"
        redis_server.kill()

        # fail_closed: a new stream is refused with a clear error; the running one goes on and ends normally.
        code, error = await refused(closed.ws_url(alice))
        assert code == 1013
        assert error is not None and error["error_type"] == "unavailable"
        for _ in range(5):
            await running.send(silence)
        await running.send(json.dumps({"type": "stop"}))
        frames = [json.loads(raw) async for raw in running]
        assert frames[-1]["type"] == "full_transcript"
        assert running.close_code == 1000

        # fail_open: admitted within the allowance (one stream per user on this replica), then refused.
        allowed = await open_stream(open_.ws_url(bob))
        code, error = await refused(open_.ws_url(bob))
        assert code == 4003 and error is not None and error["quota"] == "concurrent_streams"
        await allowed.close()

    asyncio.run(scenario())
    status = closed.status()["access"]
    assert status["shared_store_healthy"] is False and status["shared_store_failures"] >= 1
    assert "shared quota store unreachable" in closed.log()
    assert open_.status()["access"]["shared_store_failures"] >= 1

    # Redis comes back: the fail_closed replica admits streams again, and says so in its log.
    redis_server.start()
    ok = asyncio.run(stream_audio(closed.ws_url(alice), np.zeros(1600, dtype=np.float32), 16000, speed=0))
    assert ok.close_code == 1000
    assert closed.status()["access"]["shared_store_healthy"] is True
    assert "reachable again" in closed.log()


def test_redis_losing_its_data_keeps_the_days_usage(
    start_replicas: Callable[..., list[Replica]], redis_server: RedisServer
) -> None:
    # Usage goes to the database only at a stream's end here: a running stream's seconds stay unflushed.
    [replica] = start_replicas({"STREAMSCRIBE_USAGE_FLUSH_SECONDS": "3600"})
    key = new_key(replica, "alice", tier="standard")
    day = utc_day(time.time())
    one_second = json.dumps({"type": "audio", "data": encode_samples(np.zeros(16000, dtype=np.float32))})
    flushall = redis.Redis(port=redis_server.port).flushall

    def used_seconds() -> float:
        return float(limits(replica, key)["used_today_minutes"]) * 60

    async def until_used(seconds: float) -> None:
        deadline = time.monotonic() + 10
        while abs(await asyncio.to_thread(used_seconds) - seconds) > 0.01:
            assert time.monotonic() < deadline, f"used {used_seconds():.2f} s, not {seconds} s"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        running = await open_stream(replica.ws_url(key))  # sees 0 s used when it opens
        finished = await stream_audio(replica.ws_url(key), np.zeros(48000, dtype=np.float32), 16000, speed=0)
        assert finished.close_code == 1000  # its 3 s are in the database now
        await running.send(one_second)
        await until_used(4.0)  # 3 s in the database, 1 s not written yet

        flushall()
        assert await asyncio.to_thread(used_seconds) == pytest.approx(4.0, abs=0.01)  # re-read on /limits
        flushall()
        await running.send(one_second)  # the charge finds the counter missing
        await until_used(5.0)
        flushall()
        await running.close()
        await until_used(5.0)

    asyncio.run(scenario())
    store = open_store(replica.settings)
    assert store.usage_seconds("alice", day) == pytest.approx(5.0)
    store.close()


def test_a_hung_redis_does_not_hold_up_running_streams(
    start_replicas: Callable[..., list[Replica]], redis_server: RedisServer
) -> None:
    [replica] = start_replicas({})
    key = new_key(replica, "alice", tier="standard")
    frame = json.dumps({"type": "audio", "data": encode_samples(np.zeros(1600, dtype=np.float32))})
    assert redis_server.process is not None

    async def scenario() -> tuple[float, int, int | None]:
        """Stream 0.1 s frames, each followed by a ping, before, while and after Redis is paused."""
        ws = await open_stream(replica.ws_url(key))
        assert json.loads(await ws.recv())["state"] == "ready"
        _, before = await worst_pong(ws, 1.0, frame)
        redis_server.process.send_signal(signal.SIGSTOP)  # up, connected, answering nothing
        try:
            worst, during = await worst_pong(ws, 4.0, frame)
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        _, after = await worst_pong(ws, 1.0, frame)
        await ws.send(json.dumps({"type": "stop"}))
        async for _ in ws:
            pass
        return worst, before + during + after, ws.close_code

    worst, sent, close_code = asyncio.run(scenario())
    assert worst < 0.5
    assert close_code == 1000
    # What was charged while Redis did not answer reached it afterwards, once.
    expected = sent * 0.1 / 60
    deadline = time.monotonic() + 5
    while (used := limits(replica, key)["used_today_minutes"]) < expected - 1e-4:  # 4 decimals
        assert time.monotonic() < deadline, (used, expected)
        time.sleep(0.1)
    assert used == pytest.approx(expected, abs=1e-4)


def test_a_stream_dropped_mid_utterance_resumes_on_the_other_replica(
    start_replicas: Callable[..., list[Replica]], clip: Callable[[str], np.ndarray]
) -> None:
    """The client's TCP connection to one replica dies mid-utterance (no close frame); it reconnects to the
    other with its resume token: the finals and the committed offset were in Redis, so the session goes
    on there, and its full transcript is what an uninterrupted stream gets."""
    from tests.server.test_resume import DROP_AT, SECONDS, SPEED, assert_same_session

    a, b = start_replicas({}, {})
    key = new_key(a, "alice", tier="standard")
    speech = clip("long.wav")[: int(SECONDS * 16000)]
    uninterrupted = asyncio.run(stream_audio(a.ws_url(key), speech, 16000, speed=0))
    used_before = limits(a, key)["used_today_minutes"]

    resumed = asyncio.run(
        stream_audio(
            a.ws_url(key),
            speech,
            16000,
            speed=SPEED,
            drop_at=[DROP_AT],
            resume_urls=[a.ws_url(key), b.ws_url(key)],
        )
    )

    assert_same_session(resumed, uninterrupted)
    assert '"event": "stream_resumed"' in b.log() and '"event": "stream_resumed"' not in a.log()
    used = (limits(b, key)["used_today_minutes"] - used_before) * 60
    assert used == pytest.approx(SECONDS, abs=0.2), "each audio second is charged once, across replicas"


def test_a_one_stream_tier_resumes_on_the_other_replica_while_its_old_socket_is_open(
    start_replicas: Callable[..., list[Replica]],
) -> None:
    """The old socket, on one replica, went quiet without closing; the stream resumes on the other. It is
    let in on its own slot, and the old connection ends at its replica's next check (a third of the slot's
    lifetime), without freeing the slot the resumed stream holds."""
    a, b = start_replicas({}, {})
    key = new_key(a, "carol")  # the free tier: one stream at a time

    async def scenario() -> None:
        old = await open_stream(a.ws_url(key))
        while (frame := json.loads(await old.recv())).get("state") != "ready":
            pass
        new = await connect(b.ws_url(key))
        await new.send(json.dumps({"type": "config", "resume": frame["resume_token"]}))
        while (frame := json.loads(await new.recv())).get("state") != "ready":
            assert frame["type"] != "error", frame
        async with asyncio.timeout(STREAM_TTL_SECONDS * 3):
            with contextlib.suppress(ConnectionClosed):
                async for _ in old:
                    pass
        assert old.close_code == 1001
        await asyncio.sleep(STREAM_TTL_SECONDS)  # past any refresh the old lease could have made
        for replica in (a, b):
            code, error = await refused(replica.ws_url(key))
            assert code == 4003, ("the resumed stream holds the user's one slot", error)
        await new.send(json.dumps({"type": "stop"}))
        async for _ in new:
            pass
        assert new.close_code == 1000

    asyncio.run(scenario())
    assert '"event": "stream_superseded"' in a.log()
    assert limits(b, key)["active_streams"] == 0
