"""How long a Wyoming client (Home Assistant) waits for its transcript after ``audio-stop``.

Starts a server in this process with the Wyoming port, then ``--clients`` clients at once each send the
clip in real time (1024-sample chunks, as Home Assistant does), ``--rounds`` times, through the wyoming
package's AsyncTcpClient. Prints the machine factor first, then the median and worst wait from
``audio-stop`` to ``transcript``, in seconds and as a ratio to the offline wall time of the same clip:

    python bench/wyoming_latency.py --clip tests/data/short.wav --clients 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
import wave
from pathlib import Path

from machine import machine_factor
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient

from streamscribe.config import Settings
from streamscribe.server.app import create_app
from streamscribe.server.serving import GracefulServer, uvicorn_config

ROOT = Path(__file__).resolve().parent.parent
CHUNK_SAMPLES = 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(wyoming_port: int) -> GracefulServer:
    settings = Settings(port=free_port(), wyoming_port=wyoming_port, log_level="warning")
    app = create_app(settings, "bench-key-" + "b" * 32)
    server = GracefulServer(uvicorn_config(settings, app), app)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


async def wait_after_stop(port: int, pcm: bytes, rate: int) -> float:
    """Seconds from audio-stop to the transcript, the audio sent in real time before it."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=rate, width=2, channels=1).event())
        step = CHUNK_SAMPLES * 2
        for start in range(0, len(pcm), step):
            await client.write_event(
                AudioChunk(rate=rate, width=2, channels=1, audio=pcm[start : start + step]).event()
            )
            await asyncio.sleep(CHUNK_SAMPLES / rate)
        stopped = time.perf_counter()
        await client.write_event(AudioStop().event())
        while (event := await client.read_event()) is not None:
            if Transcript.is_type(event.type):
                return time.perf_counter() - stopped
    raise RuntimeError("the server closed the connection without a transcript")


async def measure(port: int, pcm: bytes, rate: int, clients: int, rounds: int) -> list[float]:
    waits: list[float] = []
    for _ in range(rounds):
        waits += await asyncio.gather(*(wait_after_stop(port, pcm, rate) for _ in range(clients)))
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clip", type=Path, default=ROOT / "tests" / "data" / "short.wav")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    factor = machine_factor(args.clip)
    print(json.dumps(factor), flush=True)
    with wave.open(str(args.clip)) as clip:
        assert clip.getsampwidth() == 2 and clip.getnchannels() == 1, "a 16-bit mono WAV"
        rate, pcm = clip.getframerate(), clip.readframes(clip.getnframes())
    offline_wall = factor["machine_factor"]["offline_wall_s_per_audio_s"] * len(pcm) / 2 / rate
    port = free_port()
    server = start_server(port)
    try:
        waits = asyncio.run(measure(port, pcm, rate, args.clients, args.rounds))
    finally:
        server.should_exit = True
    median, worst = statistics.median(waits), max(waits)
    print(
        json.dumps(
            {
                "clip": args.clip.name,
                "clients": args.clients,
                "transcriptions": len(waits),
                "wait_after_stop_s": {"median": round(median, 3), "max": round(worst, 3)},
                "wait_after_stop_times_offline": {
                    "median": round(median / offline_wall, 2),
                    "max": round(worst / offline_wall, 2),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
