"""Session resume through the real server: a client whose TCP connection dies mid-utterance (no close
frame) reconnects with its resume token and gets the same session; tokens are bound to their key's user.
(Across replicas, through Redis: tests/server/test_replicas.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamscribe.client import StreamResult, encode_samples, stream_audio
from streamscribe.protocol import StreamError
from streamscribe.server.resume import LocalResumeStore, RedisResumeStore, Resumes, ResumeStore
from tests.conftest import RunningServer, free_port, word_error_rate
from tests.server.ws_helpers import limits, new_key, refused

# 15 s of long.wav: five sentences; 13.0 s is in the middle of the fourth ("She planted tomatoes ..."), late
# enough for a final to have come before it on a loaded machine (the stream goes at 1.5 times real time).
SECONDS = 15.0
DROP_AT = 13.0
SPEED = 1.5


@pytest.fixture(scope="module")
def speech(clip: Callable[[str], np.ndarray]) -> np.ndarray:
    return clip("long.wav")[: int(SECONDS * 16000)]


@pytest.fixture
def mu_server(make_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    return make_server(auth_mode="multi_user", data_dir=tmp_path / "data")


def assert_same_session(resumed: StreamResult, uninterrupted: StreamResult) -> None:
    """One session across the drop: segment ids go on, the full transcript holds every final once, and it
    says what an uninterrupted run says."""
    assert resumed.reconnects == 1 and resumed.error is None, resumed.error
    ready = [f for f in resumed.of_type("status") if f["state"] == "ready"]
    assert len(ready) == 2 and ready[0]["resume_token"] != ready[1]["resume_token"], "a token is used once"
    assert 0 < ready[1]["resume_from"] < DROP_AT, "resumed from the end of the last final before the drop"
    finals = resumed.of_type("final")
    ids = [f["segment_id"] for f in finals]
    assert ids == list(range(len(ids))), "segment ids continue across the drop, none repeated"
    assert [f["start"] for f in finals] == sorted(f["start"] for f in finals), "one clock across the drop"
    assert all(f["committed_until"] == f["end"] for f in finals)
    assert resumed.full_transcript == " ".join(f["text"] for f in finals)
    reference = uninterrupted.full_transcript or ""
    assert word_error_rate(reference, resumed.full_transcript or "") <= 0.05, (
        reference,
        resumed.full_transcript,
    )


def test_a_stream_dropped_mid_utterance_resumes_the_same_session_charged_once(
    mu_server: RunningServer, speech: np.ndarray
) -> None:
    key = new_key(mu_server, "alice", tier="standard")
    uninterrupted = asyncio.run(stream_audio(mu_server.ws_url(key), speech, 16000, speed=0))
    before = limits(mu_server, key)["used_today_minutes"]

    resumed = asyncio.run(stream_audio(mu_server.ws_url(key), speech, 16000, speed=SPEED, drop_at=[DROP_AT]))

    assert_same_session(resumed, uninterrupted)
    assert resumed.close_code == 1000
    used = (limits(mu_server, key)["used_today_minutes"] - before) * 60
    assert used == pytest.approx(SECONDS, abs=0.2), "audio sent again after the resume is not charged again"


def test_a_resume_token_works_only_for_its_own_user_and_only_once(
    mu_server: RunningServer, speech: np.ndarray
) -> None:
    alice, bob = new_key(mu_server, "alice", tier="standard"), new_key(mu_server, "bob", tier="standard")

    async def drop_a_stream() -> str:
        async with connect(mu_server.ws_url(alice)) as ws:
            await ws.send(json.dumps({"type": "config"}))
            while (frame := json.loads(await ws.recv())).get("state") != "ready":
                pass
            await ws.send(json.dumps({"type": "audio", "data": encode_samples(speech[:16000])}))
            ws.transport.abort()  # no close frame
            return str(frame["resume_token"])

    token = asyncio.run(drop_a_stream())
    assert len(token) >= 40
    code, error = asyncio.run(refused(mu_server.ws_url(bob), {"type": "config", "resume": token}))
    assert code == 4400 and error is not None and error["error_type"] == "bad_request"
    assert "unknown or has expired" in error["message"]
    guessed = asyncio.run(refused(mu_server.ws_url(alice), {"type": "config", "resume": token[:-2] + "xx"}))
    assert guessed[0] == 4400

    async def resume(key: str) -> str:
        """The state the config with the token leads to: ready (resumed) or the error's type."""
        async with connect(mu_server.ws_url(key)) as ws:
            await ws.send(json.dumps({"type": "config", "resume": token}))
            async for raw in ws:
                frame = json.loads(raw)
                if frame["type"] == "error" or frame.get("state") == "ready":
                    return str(frame.get("state") or frame["error_type"])
        return "closed"

    assert asyncio.run(resume(alice)) == "ready", "bob's refused attempt did not use up alice's token"
    assert asyncio.run(resume(alice)) == "bad_request", "a token resumes once"


@pytest.fixture(params=["local", "redis"])
def resume_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResumeStore]:
    """Both stores, the Redis one on a real redis-server."""
    if request.param == "local":
        yield LocalResumeStore()
        return
    from tests.server.test_replicas import RedisServer

    redis = RedisServer(free_port(), tmp_path)
    redis.start()
    yield RedisResumeStore(redis.url, timeout=1.0)
    redis.kill()


class GivenBack:
    """Stands in for a StreamLease: records what a dropped connection gives back."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.handed_over = False

    async def give_back(self, seconds: float) -> None:
        self.seconds.append(seconds)

    def hand_over(self) -> None:
        self.handed_over = True


async def test_a_taken_point_is_no_longer_written_by_its_old_connection_and_points_lapse(
    resume_store: ResumeStore,
) -> None:
    resumes = Resumes(resume_store, ttl=0.5)
    lease = GivenBack()
    old = await resumes.start("alice", None)
    await old.final("one", 0, 1.5)
    old.received(2.0)
    await old.dropped(lease)  # type: ignore[arg-type]
    assert lease.seconds == [], "seen before the resume: the resumed stream knows what was received"
    assert not lease.handed_over, "not resumed yet: the slot is freed with the connection"

    with pytest.raises(StreamError):
        await resumes.start("bob", old.token)
    new = await resumes.start("alice", old.token)
    assert (new.earlier_finals, new.base_segment, new.base_seconds) == (["one"], 1, 1.5)
    assert new.received(1.0) == 0.5, "of the second resent, the half already received is free"

    await old.final("late", 1, 3.0)  # a half-open old connection writes after the resume: ignored
    await new.final("two", 1, 3.0)  # the store has received = 2.5 now
    new.received(1.5)  # up to 4.0, not saved yet
    newest = await resumes.start("alice", new.token)  # resumed before `new` saw its end
    assert newest.earlier_finals == ["one", "two"]
    assert new.superseded.is_set(), "resumed in this process: the connection it left is told at once"
    assert not await new.still_here()
    assert newest.slot == new.slot == old.slot, "one slot among the user's streams, across connections"
    await new.dropped(lease)  # type: ignore[arg-type]
    assert lease.seconds == [pytest.approx(1.5)], "what `newest` charges again is given back"
    assert lease.handed_over, "the slot is `newest`'s now: closing the old lease must not free it"
    with pytest.raises(StreamError):
        await resumes.start("alice", old.token)

    await asyncio.sleep(0.7)
    with pytest.raises(StreamError):
        await resumes.start("alice", newest.token)
    await resumes.close()


async def test_an_open_stream_keeps_its_point_from_lapsing_while_it_is_silent(
    resume_store: ResumeStore,
) -> None:
    resumes = Resumes(resume_store, ttl=0.5)
    stream = await resumes.start("alice", None)
    for _ in range(4):  # 1.2 s with no final: the connection's checks keep the point
        await asyncio.sleep(0.3)
        assert await stream.still_here()
    resumed = await resumes.start("alice", stream.token)
    assert resumed.slot == stream.slot
    await resumes.close()


def test_a_one_stream_tier_resumes_while_its_old_socket_is_still_open(
    mu_server: RunningServer, speech: np.ndarray
) -> None:
    """A phone that changed networks: its old socket went quiet without closing, and the server still
    holds it. The resume is let in on the stream's own slot, the old connection ends at once, and the user
    holds one slot, not two."""
    key = new_key(mu_server, "carol")  # the free tier: one stream at a time

    async def ready(ws: ClientConnection, config: dict[str, object]) -> dict[str, object]:
        await ws.send(json.dumps({"type": "config", **config}))
        while (frame := json.loads(await ws.recv())).get("state") != "ready":
            assert frame["type"] != "error", frame
        return frame  # type: ignore[no-any-return]

    async def scenario() -> None:
        old = await connect(mu_server.ws_url(key))
        token = (await ready(old, {}))["resume_token"]
        await old.send(json.dumps({"type": "audio", "data": encode_samples(speech[: 16000 * 3])}))
        async with connect(mu_server.ws_url(key)) as new:
            await ready(new, {"resume": token})
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionClosed):
                    async for _ in old:
                        pass
            assert old.close_code == 1001, "the connection the stream left is ended"
            assert limits(mu_server, key)["active_streams"] == 1
            code, error = await refused(mu_server.ws_url(key))
            assert code == 4003, ("the resumed stream holds the user's one slot", error)
            await new.send(json.dumps({"type": "audio", "data": encode_samples(speech[16000 * 3 :])}))
            await new.send(json.dumps({"type": "stop"}))
            frames = [json.loads(raw) async for raw in new]
        full = [f for f in frames if f["type"] == "full_transcript"]
        assert full and len(full[0]["text"].split()) >= 20, frames
        await asyncio.sleep(0.2)
        assert limits(mu_server, key)["active_streams"] == 0

    asyncio.run(scenario())
    assert not mu_server.app.state.runtime.resumes._open, "ended and refused streams leave no hold here"
