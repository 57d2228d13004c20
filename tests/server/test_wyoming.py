"""The Wyoming port, driven by the wyoming package's own AsyncTcpClient as Home Assistant drives it."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
import soxr
from wyoming.asr import Transcribe, Transcript, TranscriptChunk
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.info import Describe, Info
from wyoming.ping import Ping

from streamscribe.engines.base import AudioWindow
from streamscribe.engines.base import Transcript as EngineTranscript
from tests.conftest import DATA, RunningServer, ServerProcess, free_port, read_wav, word_error_rate

SHORT = read_wav(DATA / "short.wav")[0]
SHORT_TEXT = "Please send the quarterly report to the finance team by Friday."
READ_TIMEOUT = 60.0


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


@dataclass
class Answer:
    """What the server sent after audio-stop, in order."""

    events: list[Event] = field(default_factory=list)

    @property
    def types(self) -> list[str]:
        return [event.type for event in self.events]

    @property
    def text(self) -> str:
        return next(Transcript.from_event(e).text for e in self.events if Transcript.is_type(e.type))

    @property
    def chunks(self) -> list[str]:
        return [TranscriptChunk.from_event(e).text for e in self.events if TranscriptChunk.is_type(e.type)]

    @property
    def errors(self) -> list[Error]:
        return [Error.from_event(e) for e in self.events if Error.is_type(e.type)]


async def read_until(client: AsyncTcpClient, *types: str) -> list[Event]:
    """Events up to and including the first of ``types`` (or the connection's end)."""
    events = []
    while (event := await client.read_event()) is not None:
        events.append(event)
        if event.type in types:
            break
    return events


async def send_audio(
    client: AsyncTcpClient,
    audio: bytes,
    rate: int,
    width: int = 2,
    channels: int = 1,
    chunk_samples: int = 1024,
) -> None:
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    step = chunk_samples * width * channels
    for start in range(0, len(audio), step):
        chunk = AudioChunk(rate=rate, width=width, channels=channels, audio=audio[start : start + step])
        await client.write_event(chunk.event())


async def transcribe(
    client: AsyncTcpClient,
    audio: bytes,
    rate: int = 16000,
    width: int = 2,
    channels: int = 1,
    language: str | None = "en",
    name: str | None = None,
) -> Answer:
    """Home Assistant's request: transcribe, audio-start, audio-chunk..., audio-stop; then every event up
    to transcript-stop."""
    await client.write_event(Transcribe(name=name, language=language).event())
    await send_audio(client, audio, rate, width, channels)
    await client.write_event(AudioStop().event())
    return Answer(await read_until(client, "transcript-stop", "error"))


def assert_heard_short_clip(answer: Answer) -> None:
    assert answer.types[0] == "transcript-start"
    assert answer.types[-2:] == ["transcript", "transcript-stop"], answer.types
    assert "".join(answer.chunks) == answer.text
    assert word_error_rate(SHORT_TEXT, answer.text) < 0.2, answer.text


def test_home_assistant_transcribes_through_the_serve_process(
    server_process: Callable[..., ServerProcess],
) -> None:
    """``serve --wyoming-port``: info lists the engines, a clip's words come back as chunks and a
    transcript, a client that misbehaves and vanishes mid-audio ends nobody else's transcription nor the
    HTTP server, and SIGTERM gives an open transcription its transcript before the process exits."""
    port = free_port()
    running = server_process("--wyoming-port", str(port))

    async def misbehave() -> list[Error]:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Event(type="no-such-event"))
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=b"\0" * 640).event())
            errors = [Error.from_event(e) for e in await read_until(client, "error")]
            errors += [Error.from_event(e) for e in await read_until(client, "error")]
            await send_audio(client, pcm16(SHORT[: len(SHORT) // 2]), 16000)
        return errors  # gone mid-audio, without audio-stop

    async def scenario() -> tuple[Info, Answer, list[Error]]:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=READ_TIMEOUT) as client:
            await client.write_event(Describe().event())
            info = Info.from_event((await read_until(client, "info"))[-1])
            good, errors = await asyncio.gather(transcribe(client, pcm16(SHORT)), misbehave())
        return info, good, errors

    info, answer, errors = asyncio.run(scenario())
    (program,) = info.asr
    assert program.name == "streamscribe" and program.supports_transcript_streaming
    whisper = next(model for model in program.models if model.name == "whisper")
    assert "en" in whisper.languages
    assert_heard_short_clip(answer)
    assert [error.code for error in errors] == ["bad_request", "bad_request"]
    assert "no-such-event" in errors[0].text and "before audio-start" in errors[1].text
    assert httpx.get(f"http://127.0.0.1:{running.port}/healthz", timeout=5).status_code == 200

    async def cut_short_by_sigterm() -> Answer:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=READ_TIMEOUT) as client:
            await client.write_event(Transcribe(language="en").event())
            await send_audio(client, pcm16(np.concatenate([SHORT, np.zeros(16000, np.float32)])), 16000)
            await client.write_event(Ping().event())
            before = await read_until(client, "pong")  # every chunk before the ping has been read
            running.process.send_signal(signal.SIGTERM)
            return Answer(before[:-1] + await read_until(client, "transcript-stop"))

    drained = asyncio.run(cut_short_by_sigterm())
    assert_heard_short_clip(drained)
    running.process.wait(timeout=30)
    assert running.process.returncode in (0, -signal.SIGTERM)


def test_odd_rates_widths_and_channels_are_downmixed_and_resampled(
    make_server: Callable[..., RunningServer],
) -> None:
    """Wyoming's chunks say their own format: 44.1 kHz stereo 32-bit, 8 kHz 8-bit, 22.05 kHz 16-bit."""
    port = free_port()
    make_server(wyoming_port=port)
    stereo_44k = soxr.resample(SHORT, 16000, 44100)
    stereo = np.stack([stereo_44k, 0.5 * stereo_44k], axis=1).reshape(-1)
    as_32_bit = (np.clip(stereo, -1, 1) * (2**31 - 1)).astype("<i4").tobytes()
    as_8_bit = (np.clip(soxr.resample(SHORT, 16000, 8000), -1, 1) * 127 + 128).astype("u1").tobytes()
    as_22k = pcm16(soxr.resample(SHORT, 16000, 22050))

    async def scenario() -> list[Answer]:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=READ_TIMEOUT) as client:
            return [
                await transcribe(client, as_32_bit, rate=44100, width=4, channels=2),
                await transcribe(client, as_8_bit, rate=8000, width=1, language="en-US"),
                await transcribe(client, as_22k, rate=22050, name="whisper"),
            ]

    for answer in asyncio.run(scenario()):
        assert_heard_short_clip(answer)


def test_bad_input_gets_wyoming_errors_and_ends_no_other_transcription(
    make_server: Callable[..., RunningServer],
) -> None:
    """Readable mistakes leave the connection usable; unreadable or oversized events, and a refused
    audio-start, end that connection only, while another client's transcription goes on."""
    port = free_port()
    running = make_server(wyoming_port=port, max_streams=2)
    max_payload = running.settings.streaming.max_frame_bytes

    async def raw_exchange(raw: bytes) -> list[Error]:
        """Bytes the package's client cannot send (a bad header, a lying length); what came back, to EOF."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        await writer.drain()
        answer = []
        while (event := await asyncio.wait_for(async_read_event(reader), 30)) is not None:
            answer.append(Error.from_event(event))
        writer.close()
        return answer

    async def mistakes_then_a_transcription() -> tuple[list[Error], Answer]:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=READ_TIMEOUT) as client:
            errors = []
            await client.write_event(AudioStop().event())
            await client.write_event(Event(type="transcribe", data={"language": 42}))
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            await client.write_event(AudioChunk(rate=16000, width=3, channels=1, audio=b"\0" * 96).event())
            await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=b"\0" * 3).event())
            await client.write_event(AudioChunk(rate=100, width=2, channels=1, audio=b"\0" * 4).event())
            for _ in range(5):
                errors += [
                    Error.from_event(e) for e in await read_until(client, "error") if e.type == "error"
                ]
            await client.write_event(AudioStop().event())  # ends the transcription opened above
            await read_until(client, "transcript-stop")
            return errors, await transcribe(client, pcm16(SHORT))

    async def refused_audio_start() -> list[Event]:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=READ_TIMEOUT) as client:
            await client.write_event(Transcribe(language="xx").event())
            await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            return await read_until(client)  # the error, then the server closes

    async def scenario() -> tuple[Answer, tuple[list[Error], Answer], list[list[Error]], list[Event]]:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=READ_TIMEOUT) as bystander:
            results = await asyncio.gather(
                transcribe(bystander, pcm16(SHORT)),
                mistakes_then_a_transcription(),
                asyncio.gather(
                    raw_exchange(b"this is not json\n"),
                    raw_exchange(b"x" * 70_000),
                    raw_exchange(
                        json.dumps({"type": "audio-chunk", "payload_length": 10 * max_payload}).encode()
                        + b"\n"
                    ),
                ),
                refused_audio_start(),
            )
        return results

    bystander, (errors, after_mistakes), unreadable, refused = asyncio.run(scenario())
    assert_heard_short_clip(bystander)
    assert [error.code for error in errors] == ["bad_request"] * 2 + ["invalid_audio"] * 3
    assert "audio-stop before audio-start" in errors[0].text and "must be strings" in errors[1].text
    assert_heard_short_clip(after_mistakes)
    for answer in unreadable:
        assert [error.code for error in answer] == ["bad_request"]
    assert [event.type for event in refused] == ["error"]
    assert "xx" in Error.from_event(refused[0]).text
    runtime = running.app.state.runtime
    assert runtime.active_streams == 0
    assert httpx.get(f"{running.base_url}/healthz", timeout=5).status_code == 200


def test_wyoming_streams_count_against_max_streams(make_server: Callable[..., RunningServer]) -> None:
    port = free_port()
    make_server(wyoming_port=port, max_streams=1)

    async def scenario() -> list[Event]:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=READ_TIMEOUT) as first:
            await first.write_event(AudioStart(rate=16000, width=2, channels=1).event())
            await read_until(first, "transcript-start")
            async with AsyncTcpClient("127.0.0.1", port, read_timeout=READ_TIMEOUT) as second:
                await second.write_event(AudioStart(rate=16000, width=2, channels=1).event())
                return await read_until(second)

    refused = asyncio.run(scenario())
    assert [(e.type, Error.from_event(e).code) for e in refused] == [("error", "server_busy")]


def test_addresses_off_the_allowlist_are_refused(make_server: Callable[..., RunningServer]) -> None:
    """The allowlist is Wyoming's only access control (it has no keys)."""
    port = free_port()
    make_server(wyoming_port=port, access={"ip_allowlist": ["10.0.0.0/8"]})

    async def scenario() -> list[Event]:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=READ_TIMEOUT) as client:
            await client.write_event(Describe().event())
            return await read_until(client)

    assert [(e.type, Error.from_event(e).code) for e in asyncio.run(scenario())] == [("error", "forbidden")]


def test_a_client_refused_with_bytes_unread_gets_its_error_and_a_clean_end(
    make_server: Callable[..., RunningServer],
) -> None:
    """A server that closes with the client's bytes unread resets the connection: the client gets
    ECONNRESET, and may lose the error event it has not read yet. The server half-closes and reads the
    leftovers instead. Here an HTTP request (with a body) comes to the Wyoming port."""
    port = free_port()
    server = make_server(wyoming_port=port)

    async def scenario() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: wyoming\r\n\r\n" + b"x" * 2_000_000)
        await writer.drain()
        await asyncio.sleep(0.5)  # the server has refused the first line; a reset would be here by now
        received = await asyncio.wait_for(reader.read(), READ_TIMEOUT)  # up to the end; a reset raises
        writer.close()
        await writer.wait_closed()
        return received

    header = json.loads(asyncio.run(scenario()).split(b"\n")[0])
    assert header["type"] == "error"
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200


class _BrokenEngine:
    """Loads fine, fails on every decode (a model out of memory)."""

    name = "whisper-broken"
    sample_rate = 16000
    languages = frozenset({"en"})

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[EngineTranscript]:
        raise RuntimeError("out of memory")


def test_an_engine_failure_is_an_internal_error(make_server: Callable[..., RunningServer]) -> None:
    port = free_port()
    running = make_server(wyoming_port=port)
    running.app.state.runtime.registry.get = lambda *choice: _BrokenEngine()

    async def scenario() -> Answer:
        async with AsyncTcpClient("127.0.0.1", port, read_timeout=READ_TIMEOUT) as client:
            answer = await transcribe(client, pcm16(SHORT))
            assert await read_until(client) == []  # then the server hangs up, its stream freed
            return answer

    answer = asyncio.run(scenario())
    assert [(error.code, error.text) for error in answer.errors] == [
        ("internal_error", "the speech engine failed")
    ]
    assert "transcript" not in answer.types
    assert running.app.state.runtime.active_streams == 0
