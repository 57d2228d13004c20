"""Streams a clip at real-time pace to a server with N concurrent clients and prints what users would feel.

    python bench/stream_bench.py --clients 1 4 8            # starts its own server on a free port
    python bench/stream_bench.py --full                     # the README's table and issue #15's targets
    python bench/stream_bench.py --url ws://host:8000 --token KEY --server-pid PID --clients 4
    python bench/stream_bench.py --protocol realtime --clients 1 4   # OpenAI's Realtime API instead

It prints the machine factor first (bench/machine.py: offline CPU seconds per audio second of the same
model on the same clip, measured in this run, and the file API's WER on it), then per N one JSON object
(also given: CPU as a multiple of the offline cost): WER (mean and worst stream),
time to first partial (from the first word's start in the audio), per-sentence emission delay (from a
sentence's end in the audio to when all its words are on the client's screen, as finals or partial;
median and p90 over every sentence of every stream), final lag (from the stop message, sent 0.1 s after
the last word, to the full transcript), server CPU seconds per audio second, the server's peak RSS, how
many streams kept up (final lag under 2 s and no sentence later than 5 s), and sentences lost (sentences
of the clip whose audio no final covers, finals that meet joined: audio dropped somewhere; must be 0).

``--capacity`` then searches the largest load at which every stream keeps up with a p90 emission delay of
at most 1.5 s; ``--continuous`` streams speech without long pauses (``continuous.wav``, and a file made by
repeating it to ``--continuous-seconds``) at the loads given. Last comes one ``targets`` object with the
figures of issue #15: one stream's cost as a multiple of the offline cost and its p90 delay, capacity
times the offline cost per core, the WER at the worst load over one stream's and one stream's over the
file API's, the peak RSS at the capacity load, and the p90 delay of each continuous-speech row.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import difflib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import soxr
from machine import machine_factor, words
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamscribe.client import ReceivedFrame, StreamResult, stream_audio, stream_url

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as wav:
        assert wav.getframerate() == 16000, "bench clips are 16 kHz"
        raw = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        return (raw.reshape(-1, wav.getnchannels()).mean(axis=1) / 32768.0).astype(np.float32)


def displayed_over_time(frames: list[ReceivedFrame]) -> list[tuple[float, list[str]]]:
    """What the client shows after each transcript frame: finals so far plus the current partial."""
    finals: list[str] = []
    partial = ""
    shown: list[tuple[float, list[str]]] = []
    for received in frames:
        frame = received.frame
        if frame["type"] == "final":
            finals.append(frame["text"])
            partial = ""
        elif frame["type"] == "partial":
            partial = frame["text"]
        else:
            continue
        shown.append((received.at, words(" ".join([*finals, partial]))))
    return shown


def emission_delays(
    frames: list[ReceivedFrame], sentences: list[dict[str, Any]], speed: float
) -> list[float]:
    """Per sentence: arrival of the frame that put its last word (or all but a misheard last one) on screen,
    minus when the sentence's end was sent. Sentences never shown count as the final arrival time."""
    reference: list[str] = []
    ends: list[int] = []
    for sentence in sentences:
        reference += words(sentence["text"])
        ends.append(len(reference) - 1)
    reached: list[tuple[float, int, int]] = []  # (time, furthest reference index matched, words shown)
    for at, hypothesis in displayed_over_time(frames):
        blocks = difflib.SequenceMatcher(None, reference, hypothesis, autojunk=False).get_matching_blocks()
        # Only matches near the diagonal: a stray "the" must not count as reaching a later sentence.
        furthest = max((b.a + b.size - 1 for b in blocks if b.size and abs(b.a - b.b) <= 6), default=-1)
        reached.append((at, furthest, len(hypothesis)))
    last = frames[-1].at if frames else 0.0
    delays = []
    for sentence, end_index in zip(sentences, ends, strict=True):
        shown_at = next(
            (
                at
                for at, furthest, count in reached
                if furthest >= end_index or (furthest >= end_index - 1 and count >= end_index + 1)
            ),
            last,
        )
        delays.append(shown_at - sentence["end"] / speed)
    return delays


def joined_spans(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Finals' time spans, those that meet (an utterance cut in a pause, its rest the next) joined: a
    sentence split between two finals is not lost."""
    joined: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if joined and start <= joined[-1][1] + 0.01:
            joined[-1] = (joined[-1][0], max(end, joined[-1][1]))
        else:
            joined.append((start, end))
    return joined


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(token: str, stderr: Any = None) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        # Benchmarks measure the engine: streams faster than real time are not paced (--speed 0, robustness).
        "STREAMSCRIBE_STREAMING__MAX_AUDIO_SPEED": "0",
        **os.environ,
        "STREAMSCRIBE_API_KEY": token,
        "STREAMSCRIBE_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "streamscribe.cli", "serve", "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return process, f"ws://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start")


async def stream_realtime(
    url: str, token: str, samples: np.ndarray, speed: float, config: dict[str, Any]
) -> StreamResult:
    """Stream through OpenAI's Realtime API (server VAD, 0.1 s appends of 24 kHz pcm16, a commit at the end)
    and note its events as the seed protocol's frames, so ``measure`` reads both alike: the deltas so far
    of an item as a partial, its completion as a final (timed by speech_started/stopped), then the full
    transcript once every committed item is completed."""
    pcm = (np.clip(soxr.resample(samples, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()
    result = StreamResult(audio_seconds=len(samples) / 16000)
    transcription = {key: config[key] for key in ("model", "language") if key in config}
    session = {"type": "transcription", "audio": {"input": {"transcription": transcription}}}
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(
        url, additional_headers=headers, max_size=None, open_timeout=30, ping_timeout=None
    ) as ws:
        start = time.monotonic()
        texts: dict[str, str] = {}
        spans: dict[str, list[float]] = {}
        committed: set[str] = set()
        finals: list[str] = []
        answered = False  # the closing commit: it ended the open utterance, or there was none
        done = asyncio.Event()

        def note(frame: dict[str, Any]) -> None:
            result.frames.append(ReceivedFrame(time.monotonic() - start, frame))

        async def receive() -> None:
            nonlocal answered
            with contextlib.suppress(ConnectionClosed):
                async for raw in ws:
                    event = json.loads(raw)
                    kind, item = event["type"], event.get("item_id", "")
                    if kind == "input_audio_buffer.speech_started":
                        spans[item] = [event["audio_start_ms"] / 1000, float("inf")]
                    elif kind == "input_audio_buffer.speech_stopped":
                        spans.setdefault(item, [0.0, 0.0])[1] = event["audio_end_ms"] / 1000
                    elif kind == "input_audio_buffer.committed":
                        committed.add(item)
                        answered = answered or spans.get(item, [0.0, 0.0])[1] == float("inf")
                    elif kind.endswith("input_audio_transcription.delta"):
                        texts[item] = texts.get(item, "") + event["delta"]
                        note({"type": "partial", "text": texts[item]})
                    elif kind.endswith("input_audio_transcription.completed"):
                        committed.discard(item)
                        begin, end = spans.get(item, [0.0, result.audio_seconds])
                        note({"type": "final", "text": event["transcript"], "start": begin, "end": end})
                        if event["transcript"]:
                            finals.append(event["transcript"])
                    elif kind == "error" and event["error"]["code"] == "input_audio_buffer_commit_empty":
                        answered = True  # the last utterance had ended before the commit
                    elif kind == "error":
                        note(event)
                    if answered and not committed:
                        done.set()
            done.set()

        receiver = asyncio.create_task(receive())
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        step = 2 * 2400  # 0.1 s of 24 kHz pcm16
        for index, offset in enumerate(range(0, len(pcm), step)):
            if speed > 0 and (delay := start + index * 0.1 / speed - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            chunk = base64.b64encode(pcm[offset : offset + step]).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        result.sent_at_end = time.monotonic() - start
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await asyncio.wait_for(done.wait(), 600)
        note({"type": "full_transcript", "text": " ".join(finals)})
        await ws.close()
        receiver.cancel()
        result.close_code = 1000
    return result


async def run_clients(
    url: str,
    samples: np.ndarray,
    clients: int,
    speed: float,
    config: dict[str, Any],
    binary: bool = False,
    protocol: str = "seed",
    token: str = "",
) -> list[StreamResult]:
    async def one(index: int) -> StreamResult:
        await asyncio.sleep(index * 0.5 / clients)  # real users do not start in lockstep
        if protocol == "realtime":
            return await stream_realtime(url, token, samples, speed, config)
        return await stream_audio(url, samples, 16000, config=config, speed=speed, timeout=600, binary=binary)

    return await asyncio.gather(*(one(i) for i in range(clients)))


def measure(
    url: str,
    pid: int | None,
    clip: Clip,
    clients: int,
    speed: float,
    config: dict[str, Any],
    binary: bool = False,
    protocol: str = "seed",
    token: str = "",
) -> dict[str, Any]:
    cpu_before = process_cpu_seconds(pid) if pid else None
    results = asyncio.run(run_clients(url, clip.samples, clients, speed, config, binary, protocol, token))
    cpu = process_cpu_seconds(pid) - cpu_before if pid and cpu_before is not None else None
    reference = " ".join(words(clip.reference))
    first_word = clip.segments[0]["start"] / speed
    wers, first_partials, delays, lags, kept_up, lost = [], [], [], [], 0, 0
    for result in results:
        wers.append(jiwer.wer(reference, " ".join(words(result.full_transcript or ""))))
        texts = [f.at for f in result.frames if f.frame["type"] in ("partial", "final") and f.frame["text"]]
        first_partials.append((texts[0] if texts else float("nan")) - first_word)
        stream_delays = emission_delays(result.frames, clip.segments, speed)
        delays += stream_delays
        full = [f.at for f in result.frames if f.frame["type"] == "full_transcript"]
        lag = full[-1] - result.sent_at_end if full else float("inf")
        lags.append(lag)
        kept_up += int(lag < 2.0 and max(stream_delays) < 5.0 and result.close_code == 1000)
        spans = joined_spans([(f["start"], f["end"]) for f in result.of_type("final")])
        lost += sum(
            not any(start <= s["start"] + 0.3 and s["end"] - 0.3 <= end for start, end in spans)
            for s in clip.segments
        )
    audio_seconds = clients * len(clip.samples) / 16000
    return {
        "clip": clip.name,
        "protocol": protocol,
        "clients": clients,
        "wer_mean": round(statistics.mean(wers), 4),
        "wer_worst": round(max(wers), 4),
        "first_partial_s": round(statistics.median(first_partials), 3),
        "emission_delay_median_s": round(percentile(delays, 50), 3),
        "emission_delay_p90_s": round(percentile(delays, 90), 3),
        "final_lag_median_s": round(statistics.median(lags), 3),
        "final_lag_max_s": round(max(lags), 3),
        "cpu_s_per_audio_s": round(cpu / audio_seconds, 4) if cpu is not None else None,
        "peak_rss_mb": round(peak_rss_mb(pid), 1) if pid else None,
        "kept_up": f"{kept_up}/{clients}",
        "sentences_lost": lost,
    }


@dataclass(frozen=True)
class Clip:
    """Audio to stream and what it says: its sentences (start, end, text) and the whole reference."""

    name: str
    samples: np.ndarray
    segments: list[dict[str, Any]]
    reference: str


def load_clip(path: Path, manifest: Path, seconds: float | None = None, keep_tail: bool = False) -> Clip:
    """A manifest clip, its first ``seconds`` only if given; it ends just after its last word unless
    ``keep_tail``, so the final lag includes decoding the last sentence."""
    item = {i["path"]: i for i in json.loads(manifest.read_text())["items"]}[path.name]
    return trimmed(Clip(path.name, read_wav(path), item["segments"], item["reference"]), seconds, keep_tail)


def trimmed(clip: Clip, seconds: float | None, keep_tail: bool) -> Clip:
    samples, segments = clip.samples, clip.segments
    if seconds:
        samples = samples[: int(seconds * 16000)]
        segments = [s for s in segments if s["end"] <= seconds]
    if not keep_tail:
        samples = samples[: int((segments[-1]["end"] + 0.1) * 16000)]
    return Clip(clip.name, samples, segments, " ".join(s["text"] for s in segments))


def repeated(clip: Clip, seconds: float) -> Clip:
    """``clip`` played again and again until it lasts ``seconds``: a long talk without a long pause."""
    length = len(clip.samples) / 16000
    copies = int(np.ceil(seconds / length))
    segments = [
        {**s, "start": s["start"] + k * length, "end": s["end"] + k * length}
        for k in range(copies)
        for s in clip.segments
    ]
    looped = Clip(f"{clip.name} x{seconds:.0f}s", np.tile(clip.samples, copies), segments, "")
    return trimmed(looped, seconds, keep_tail=False)


def keeps_up(row: dict[str, Any]) -> bool:
    """The capacity rule: every stream kept up, and p90 emission delay at most 1.5 s."""
    kept, clients = (int(n) for n in row["kept_up"].split("/"))
    return kept == clients and row["emission_delay_p90_s"] <= 1.5


def capacity_search(
    run: Callable[[int], dict[str, Any]], rows: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The largest load that keeps up (``keeps_up``), from the rows measured so far: more streams by
    half again until one does not keep up, then halving the gap to within an eighth. Returns its row."""
    passed = {r["clients"]: r for r in rows if keeps_up(r)}
    failed = [r["clients"] for r in rows if not keeps_up(r)]
    low = max(passed, default=0)
    high = min((n for n in failed if n > low), default=None)
    while True:
        if high is None:
            clients = max(low + 2, int(np.ceil(low * 1.5)))
        elif high - low <= max(1, low // 8):
            return passed.get(low)
        else:
            clients = (low + high) // 2
        row = run(clients)
        row["capacity_probe"] = True
        print(json.dumps(row), flush=True)
        if keeps_up(row):
            passed[clients], low = row, clients
        else:
            high = clients


def targets(
    factor: dict[str, Any],
    rows: list[dict[str, Any]],
    capacity: dict[str, Any] | None,
    continuous: list[dict[str, Any]],
) -> dict[str, Any]:
    """Issue #15's figures, as ratios to this machine where they are costs."""
    offline = factor["offline_cpu_s_per_audio_s"]
    one = next((r for r in rows if r["clients"] == 1), None)
    figures: dict[str, Any] = {}
    if one is not None:
        figures["one_stream_cpu_x_offline"] = one["cpu_x_offline"]  # at most 3
        figures["one_stream_p90_s"] = one["emission_delay_p90_s"]  # at most 0.6
        if one["wer_mean"]:
            worst = max(r["wer_mean"] for r in rows)
            figures["wer_worst_load_x_one_stream"] = round(worst / one["wer_mean"], 3)  # at most 1.1
        if factor.get("offline_wer"):
            figures["one_stream_wer_x_file_api"] = round(one["wer_mean"] / factor["offline_wer"], 3)  # 1.1
    if capacity is not None:
        figures["capacity_streams"] = capacity["clients"]
        # At least 0.5; 1.0 would mean every audio second decoded once at offline cost.
        figures["capacity_x_offline_per_core"] = round(capacity["clients"] * offline / factor["cores"], 3)
        figures["capacity_peak_rss_mb"] = capacity["peak_rss_mb"]  # under 1024
    for row in continuous:  # at most 1.5 s at 1 stream, 2 s at 8
        figures[f"p90_s {row['clip']} x{row['clients']}"] = row["emission_delay_p90_s"]
    return {"targets": figures}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--capacity", action="store_true", help="then search the largest load that keeps up")
    parser.add_argument(
        "--continuous", type=int, nargs="*", default=[], help="loads for the continuous-speech rows"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="the whole table: --clients 1 4 8 16 --capacity --continuous 1 8",
    )
    parser.add_argument("--clip", type=Path, default=DATA / "long.wav")
    parser.add_argument("--continuous-clip", type=Path, default=DATA / "continuous.wav")
    parser.add_argument("--continuous-seconds", type=float, default=180.0, help="of the repeated file")
    parser.add_argument("--manifest", type=Path, default=DATA / "manifest.json")
    parser.add_argument("--speed", type=float, default=1.0, help="times real time (1 = live)")
    parser.add_argument("--seconds", type=float, help="only the first N seconds of the clip")
    parser.add_argument("--keep-tail", action="store_true", help="send the clip's trailing silence too")
    parser.add_argument("--url", help="existing server (default: start one)")
    parser.add_argument("--token", default="bench-" + "k" * 40)
    parser.add_argument("--server-pid", type=int, help="pid of an existing server, for CPU and memory")
    parser.add_argument("--model", help="model to request (server default if omitted)")
    parser.add_argument("--language", default="en")
    parser.add_argument("--audio-format", choices=["float32", "pcm16", "mulaw", "alaw"], default="float32")
    parser.add_argument("--binary", action="store_true", help="audio in binary frames, not base64 JSON")
    parser.add_argument(
        "--protocol",
        choices=["seed", "realtime"],
        default="seed",
        help="this server's or OpenAI's Realtime API (24 kHz pcm16: --audio-format, --binary not used)",
    )
    args = parser.parse_args()
    if args.full:
        args.clients, args.capacity, args.continuous = [1, 4, 8, 16], True, args.continuous or [1, 8]

    clip = load_clip(args.clip, args.manifest, args.seconds, args.keep_tail)
    config: dict[str, Any] = {"language": args.language, "audio_format": args.audio_format}
    if args.model:
        config["model"] = args.model

    # First the machine factor: every figure below reads as a ratio to this machine's offline cost.
    factor = machine_factor(args.clip, reference=load_clip(args.clip, args.manifest).reference)  # whole clip
    print(json.dumps(factor), flush=True)
    offline = factor["machine_factor"]["offline_cpu_s_per_audio_s"]
    process = None
    if args.url:
        url, pid = args.url, args.server_pid
    else:
        process, url = start_server(args.token)
        pid = process.pid

    def run(streamed: Clip, clients: int) -> dict[str, Any]:
        if args.protocol == "realtime":
            target = f"{url}/v1/realtime?intent=transcription"
        else:
            target = stream_url(url, args.token)
        row = measure(
            target, pid, streamed, clients, args.speed, config, args.binary, args.protocol, args.token
        )
        cpu = row["cpu_s_per_audio_s"]
        row["cpu_x_offline"] = round(cpu / offline, 2) if cpu is not None else None
        return row

    try:
        rows = []
        for clients in args.clients:
            rows.append(run(clip, clients))
            print(json.dumps(rows[-1]), flush=True)
        capacity = capacity_search(lambda n: run(clip, n), rows) if args.capacity else None
        continuous = []
        if args.continuous:
            talk = load_clip(args.continuous_clip, args.manifest)
            for streamed in (talk, repeated(talk, args.continuous_seconds)):
                for clients in args.continuous:
                    continuous.append(run(streamed, clients))
                    print(json.dumps(continuous[-1]), flush=True)
        print(json.dumps(targets(factor["machine_factor"], rows, capacity, continuous)), flush=True)
    finally:
        if process:
            process.terminate()
            process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
