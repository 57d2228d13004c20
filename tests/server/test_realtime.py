"""OpenAI's Realtime API (transcription intent) through a real server, the bundled model and the official
``openai`` client's realtime connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from openai import AsyncOpenAI
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from streamscribe.audio import encode_g711
from streamscribe.protocol import AudioFormat
from streamscribe.server.store import open_store
from tests.conftest import RunningServer, word_error_rate
from tests.server.test_multi_user import multi_user
from tests.server.ws_helpers import limits, new_key, refused

SHORT_REFERENCE = "Please send the quarterly report to the finance team by Friday."
CHUNK = 2400  # 0.1 s at 24 kHz


def pcm24k(samples: np.ndarray) -> bytes:
    """16 kHz float samples as OpenAI's audio/pcm: 16-bit little-endian mono at 24 kHz."""
    resampled = soxr.resample(samples, 16000, 24000)
    return (np.clip(resampled, -1, 1) * 32767).astype("<i2").tobytes()


def client_for(server: RunningServer, key: str | None = None) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key or server.api_key, base_url=f"{server.base_url}/v1", max_retries=0)


async def transcribe(
    server: RunningServer, audio: bytes, session: dict[str, Any], commit: bool, key: str | None = None
) -> list[Any]:
    """Stream ``audio`` through the openai client, then read events until every committed item is
    completed; returns every event the server sent."""
    events: list[Any] = []
    client = client_for(server, key)
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as connection:
        await connection.session.update(session=session)  # type: ignore[arg-type]
        for start in range(0, len(audio), CHUNK * 2):
            chunk = base64.b64encode(audio[start : start + CHUNK * 2]).decode()
            await connection.input_audio_buffer.append(audio=chunk)
        if commit:
            await connection.input_audio_buffer.commit()
        committed: set[str] = set()
        completed: set[str] = set()
        async with asyncio.timeout(60):
            async for event in connection:
                events.append(event)
                if event.type == "input_audio_buffer.committed":
                    committed.add(event.item_id)
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    completed.add(event.item_id)
                elif event.type == "error":
                    raise AssertionError(event.error)
                if committed and committed == completed:
                    break
    return events


def by_type(events: list[Any], kind: str) -> list[Any]:
    return [event for event in events if event.type == kind]


def test_server_vad_clip_arrives_as_deltas_and_completions(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    silence = np.zeros(24000, dtype="<i2").tobytes()  # a second: the VAD hears the speech end
    audio = pcm24k(clip("short.wav")) + silence
    session = {
        "type": "transcription",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500},
            }
        },
    }
    events = asyncio.run(transcribe(server, audio, session, commit=False))

    kinds = [event.type for event in events]
    assert kinds[:2] == ["session.created", "session.updated"]
    updated = events[1].session
    assert updated.audio.input.turn_detection.silence_duration_ms == 500
    assert updated.audio.input.format.rate == 24000
    [started] = by_type(events, "input_audio_buffer.speech_started")
    [stopped] = by_type(events, "input_audio_buffer.speech_stopped")
    [committed] = by_type(events, "input_audio_buffer.committed")
    [completed] = by_type(events, "conversation.item.input_audio_transcription.completed")
    deltas = by_type(events, "conversation.item.input_audio_transcription.delta")
    item = started.item_id
    assert stopped.item_id == committed.item_id == completed.item_id == item
    assert all(delta.item_id == item for delta in deltas)
    assert 0 <= started.audio_start_ms < stopped.audio_end_ms <= 4100
    assert kinds.index("input_audio_buffer.committed") < kinds.index(completed.type)
    assert word_error_rate(SHORT_REFERENCE, completed.transcript) <= 0.2
    # Deltas are never retracted: together they are the final's words (a word's punctuation may differ).
    assert deltas
    assert word_error_rate(completed.transcript, "".join(d.delta for d in deltas)) <= 0.2
    assert completed.usage.type == "duration" and 2.0 < completed.usage.seconds < 4.0


def test_without_turn_detection_a_commit_ends_the_item(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    session = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
    events = asyncio.run(transcribe(server, pcm24k(clip("short.wav")), session, commit=True))

    assert events[1].session.audio.input.turn_detection is None
    assert not by_type(events, "input_audio_buffer.speech_started")
    [committed] = by_type(events, "input_audio_buffer.committed")
    [completed] = by_type(events, "conversation.item.input_audio_transcription.completed")
    assert completed.item_id == committed.item_id
    assert committed.previous_item_id is None
    assert word_error_rate(SHORT_REFERENCE, completed.transcript) <= 0.2


@pytest.mark.parametrize(
    ("wire", "audio_format"), [("audio/pcmu", AudioFormat.MULAW), ("audio/pcma", AudioFormat.ALAW)]
)
def test_g711_audio_is_transcribed(
    server: RunningServer, clip: Callable[[str], np.ndarray], wire: str, audio_format: AudioFormat
) -> None:
    telephone = encode_g711(soxr.resample(clip("short.wav"), 16000, 8000), audio_format)
    session = {
        "type": "transcription",
        "audio": {"input": {"format": {"type": wire}, "turn_detection": None}},
    }
    events = asyncio.run(transcribe(server, telephone, session, commit=True))

    assert events[1].session.audio.input.format.type == wire
    [completed] = by_type(events, "conversation.item.input_audio_transcription.completed")
    assert word_error_rate(SHORT_REFERENCE, completed.transcript) <= 0.2
    assert 2.5 < completed.usage.seconds < 3.5  # seconds of audio as sent (8 kHz, a byte a sample)


async def _raw_session(server: RunningServer, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key or server.api_key}"}
    return await connect(
        f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription", additional_headers=headers
    )


async def _next(ws: Any, kind: str | None = None) -> dict[str, Any]:
    while True:
        event = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if kind is None or event["type"] == kind:
            return event  # type: ignore[no-any-return]


def test_bad_events_get_openai_errors_and_the_session_goes_on(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    async def scenario() -> None:
        ws = await _raw_session(server)
        neighbour = await _raw_session(server)  # another stream, which must not notice
        assert (await _next(ws))["type"] == "session.created"
        await _next(neighbour, "session.created")
        await neighbour.send(json.dumps({"type": "session.update", "session": {"type": "transcription"}}))
        await _next(neighbour, "session.updated")

        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "e1"}))
        error = (await _next(ws))["error"]
        assert (error["type"], error["code"], error["event_id"]) == (
            "invalid_request_error",
            "session_not_configured",
            "e1",
        )
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime"}}))
        assert (await _next(ws))["error"]["param"] == "session.type"
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription"}}))
        assert (await _next(ws))["type"] == "session.updated"

        await ws.send(json.dumps({"type": "response.create"}))
        assert (await _next(ws))["error"]["param"] == "type"
        await ws.send("not json")
        assert (await _next(ws))["error"]["code"] == "bad_request"
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}))
        assert (await _next(ws))["error"]["code"] == "invalid_audio"
        oversized = base64.b64encode(bytes(server.settings.streaming.max_frame_bytes + 8)).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": oversized}))
        error = (await _next(ws))["error"]
        assert (error["code"], error["param"]) == ("invalid_audio", "audio")
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        assert (await _next(ws))["error"]["code"] == "input_audio_buffer_commit_empty"
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert (await _next(ws))["type"] == "input_audio_buffer.cleared"
        await ws.close()

        # The neighbour's stream still transcribes.
        audio = pcm24k(clip("short.wav")) + bytes(48000)
        for start in range(0, len(audio), 9600):
            chunk = base64.b64encode(audio[start : start + 9600]).decode()
            await neighbour.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        completed = await _next(neighbour, "conversation.item.input_audio_transcription.completed")
        assert word_error_rate(SHORT_REFERENCE, completed["transcript"]) <= 0.2
        await neighbour.close()

    asyncio.run(scenario())


def test_a_wrong_key_or_intent_is_refused_in_openai_shape(server: RunningServer) -> None:
    async def scenario() -> None:
        ws = await _raw_session(server, key="wrong-key-" + "y" * 30)
        error = await _next(ws, "error")
        assert (error["error"]["code"], error["error"]["type"]) == ("auth_failed", "invalid_request_error")
        await ws.wait_closed()
        assert ws.close_code == 4401

        headers = {"Authorization": f"Bearer {server.api_key}"}
        async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime", additional_headers=headers) as ws:
            error = await _next(ws, "error")
            assert "intent=transcription" in error["error"]["message"]
            await ws.wait_closed()
        assert ws.close_code == 4400

        # A page from another site gets no socket (the Origin policy of the other WebSocket).
        with pytest.raises(InvalidStatus) as refused_upgrade:
            await connect(
                f"ws://127.0.0.1:{server.port}/v1/realtime?intent=transcription",
                additional_headers=headers,
                origin=Origin("http://evil.example"),
            )
        assert refused_upgrade.value.response.status_code == 403

    asyncio.run(scenario())


def test_keys_and_quotas_apply_as_to_the_seed_protocol(
    make_server: Callable[..., RunningServer], tmp_path: Path, clip: Callable[[str], np.ndarray]
) -> None:
    # Free tier: one stream at a time, 3 s a day; slots refreshed (and keys re-checked) every 0.5 s.
    running = make_server(**multi_user(tmp_path, shared_store={"stream_ttl_seconds": 1.5}))
    key = new_key(running, "alice")
    limits_only = new_key(running, "dashboard", scope="limits")
    revoked = new_key(running, "carol", tier="standard")

    async def scenario() -> None:
        ws = await _raw_session(running, limits_only)
        assert (await _next(ws, "error"))["error"]["code"] == "forbidden"
        await ws.wait_closed()
        assert ws.close_code == 4403

        # The openai client's Bearer key holds the user's one stream slot, for either protocol.
        connection = (
            await client_for(running, key).realtime.connect(extra_query={"intent": "transcription"}).enter()
        )
        assert (await connection.recv()).type == "session.created"
        code, error = await refused(running.ws_url(key))
        assert code == 4003 and error is not None and error["quota"] == "concurrent_streams"
        second = await _raw_session(running, key)
        error = (await _next(second, "error"))["error"]
        assert (error["code"], error["param"]) == ("quota_exceeded", "concurrent_streams")
        await second.wait_closed()
        assert second.close_code == 4003

        # Its audio is charged to the same daily minutes: past 3 s the stream ends.
        await connection.session.update(session={"type": "transcription"})
        assert (await connection.recv()).type == "session.updated"
        second_of_silence = base64.b64encode(bytes(48000)).decode()
        for _ in range(4):
            await connection.input_audio_buffer.append(audio=second_of_silence)
        event = await connection.recv()
        assert event.type == "error" and event.error.code == "quota_exceeded"
        assert event.error.param == "daily_minutes"
        await connection.close()

        # A key revoked while it streams: the open utterance's item is completed, then auth_failed, 4401.
        ws = await _raw_session(running, revoked)
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription"}}))
        await _next(ws, "session.updated")
        speech = pcm24k(clip("short.wav"))[: 2 * 24000 * 16 // 10]  # 1.6 s: still speaking when revoked
        await ws.send(
            json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(speech).decode()})
        )
        await _next(ws, "input_audio_buffer.speech_started")
        store = open_store(running.settings)  # as `streamscribe keys revoke` does, from outside the server
        assert store.revoke_key(store.list_keys("carol")[0].key_id)
        store.close()
        kinds = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                kinds.append((await _next(ws))["type"])
        assert kinds[-1] == "error" and ws.close_code == 4401
        assert "conversation.item.input_audio_transcription.completed" in kinds

    asyncio.run(scenario())
    report = limits(running, key)
    assert report["used_today_minutes"] == pytest.approx(3 / 60, abs=2e-3)
    assert report["can_start_stream"] is False


def test_commits_chain_items_and_clear_drops_only_uncommitted_audio(
    server: RunningServer, clip: Callable[[str], np.ndarray]
) -> None:
    speech = pcm24k(clip("short.wav"))

    async def scenario() -> list[Any]:
        events: list[Any] = []
        async with client_for(server).realtime.connect(extra_query={"intent": "transcription"}) as connection:
            await connection.session.update(
                session={"type": "transcription", "audio": {"input": {"turn_detection": None}}}
            )  # type: ignore[typeddict-item]
            for audio, then in ((speech, "commit"), (speech, "clear"), (speech, "commit")):
                for start in range(0, len(audio), CHUNK * 2):
                    chunk = base64.b64encode(audio[start : start + CHUNK * 2]).decode()
                    await connection.input_audio_buffer.append(audio=chunk)
                if then == "commit":
                    await connection.input_audio_buffer.commit()
                else:
                    await connection.input_audio_buffer.clear()
            async with asyncio.timeout(60):
                async for event in connection:
                    events.append(event)
                    assert event.type != "error", event
                    if len(by_type(events, "conversation.item.input_audio_transcription.completed")) == 2:
                        break
        return events

    events = asyncio.run(scenario())
    first, second = by_type(events, "input_audio_buffer.committed")
    assert (first.previous_item_id, second.previous_item_id) == (None, first.item_id)
    assert len(by_type(events, "input_audio_buffer.cleared")) == 1
    completed = by_type(events, "conversation.item.input_audio_transcription.completed")
    assert [c.item_id for c in completed] == [first.item_id, second.item_id]
    for item in completed:
        assert word_error_rate(SHORT_REFERENCE, item.transcript) <= 0.2
        assert 2.5 < item.usage.seconds < 3.5
    # Only the committed items' text went out: none of the cleared audio's.
    delta_items = {d.item_id for d in by_type(events, "conversation.item.input_audio_transcription.delta")}
    assert delta_items <= {first.item_id, second.item_id} | {None}


def test_shutdown_finishes_the_utterance_under_way_then_closes_1001(
    make_server: Callable[..., RunningServer], clip: Callable[[str], np.ndarray]
) -> None:
    running = make_server(shutdown_grace_seconds=12)
    pause = np.zeros(16000, dtype=np.float32)
    speech = pcm24k(np.concatenate([clip("short.wav"), pause, clip("short.wav")]))

    async def scenario() -> tuple[list[dict[str, Any]], int | None]:
        ws = await _raw_session(running)
        await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription"}}))
        await _next(ws, "session.updated")
        events: list[dict[str, Any]] = []

        async def send_in_real_time() -> None:
            start = asyncio.get_running_loop().time()
            for index, offset in enumerate(range(0, len(speech), CHUNK * 2)):
                await asyncio.sleep(max(0.0, start + index * 0.1 - asyncio.get_running_loop().time()))
                if index == 15:  # 1.5 s in: mid-way through the first sentence
                    running.app.state.runtime.draining.set()
                chunk = base64.b64encode(speech[offset : offset + CHUNK * 2]).decode()
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))

        sender = asyncio.create_task(send_in_real_time())
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                events.append(json.loads(raw))
        sender.cancel()
        return events, ws.close_code

    events, code = asyncio.run(scenario())
    assert code == 1001
    completed = [e for e in events if e["type"].endswith("transcription.completed")]
    assert len(completed) == 1, "the utterance under way was finished; no new one was started"
    assert word_error_rate(SHORT_REFERENCE, completed[0]["transcript"]) <= 0.2
    assert events[-1] == completed[0]
