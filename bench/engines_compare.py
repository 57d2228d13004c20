"""Moonshine base against Whisper tiny.en on the same English clips, in one run, through one real server.

    python bench/engines_compare.py                          # every English clip of ../shared/audio
    python bench/engines_compare.py --clips short.wav long.wav --clients 1

Prints the machine factor first (tiny.en's offline CPU seconds per audio second on tests/data/long.wav,
bench/machine.py) and Moonshine's offline cost the same way, then one JSON object per model and mode:
the file API (every clip posted once: WER over all their words, server CPU seconds per audio second) and
live streams at 1x with N clients (WER, CPU seconds per audio second, p90 emission delay over every
sentence of every clip, as bench/stream_bench.py measures them). Each CPU figure also comes as a ratio to
the machine factor, which is what compares across machines. A clip without sentence timings in the
manifest counts as one sentence that ends with the clip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
import uuid
import wave
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import soxr
from machine import machine_factor
from stream_bench import emission_delays, percentile, process_cpu_seconds, run_clients, start_server, words

from streamscribe.client import stream_url

ROOT = Path(__file__).resolve().parent.parent
SHARED_AUDIO = ROOT.parent / "shared" / "audio"
MODELS = {"whisper": "whisper-1", "moonshine": "moonshine"}  # engine -> name the file API takes


def read_clip(path: Path) -> np.ndarray:
    """Mono float32 at 16 kHz (phone8k.wav is 8 kHz)."""
    with wave.open(str(path)) as wav:
        raw = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        samples = (raw.reshape(-1, wav.getnchannels()).mean(axis=1) / 32768.0).astype(np.float32)
        rate = wav.getframerate()
    return samples if rate == 16000 else soxr.resample(samples, rate, 16000).astype(np.float32)


def post_file(base_url: str, token: str, path: Path, model: str) -> str:
    """The text of one clip posted to /v1/audio/transcriptions (multipart by hand: no extra client)."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{base_url}/v1/audio/transcriptions",
        data=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return str(json.loads(response.read())["text"])


def sentences(item: dict[str, Any]) -> list[dict[str, Any]]:
    return item.get("segments") or [{"start": 0.0, "end": item["duration"], "text": item["reference"]}]


def file_api(
    base_url: str, token: str, pid: int, clips: list[tuple[Path, dict[str, Any]]], model: str
) -> dict:
    cpu = process_cpu_seconds(pid)
    references, texts, seconds = [], [], 0.0
    for path, item in clips:
        texts.append(" ".join(words(post_file(base_url, token, path, MODELS[model]))))
        references.append(" ".join(words(item["reference"])))
        seconds += item["duration"]
    cpu = process_cpu_seconds(pid) - cpu
    return {"wer": round(jiwer.wer(references, texts), 4), "cpu_s_per_audio_s": round(cpu / seconds, 4)}


def live(url: str, pid: int, clips: list[tuple[Path, dict[str, Any]]], model: str, clients: int) -> dict:
    config = {"language": "en", "model": model}
    cpu = process_cpu_seconds(pid)
    references, texts, delays, seconds = [], [], [], 0.0
    for path, item in clips:
        results = asyncio.run(run_clients(url, read_clip(path), clients, 1.0, config))
        for result in results:
            references.append(" ".join(words(item["reference"])))
            texts.append(" ".join(words(result.full_transcript or "")))
            delays += emission_delays(result.frames, sentences(item), 1.0)
        seconds += clients * item["duration"]
    cpu = process_cpu_seconds(pid) - cpu
    return {
        "wer": round(jiwer.wer(references, texts), 4),
        "cpu_s_per_audio_s": round(cpu / seconds, 4),
        "emission_delay_p90_s": round(percentile(delays, 90), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--audio", type=Path, default=SHARED_AUDIO if SHARED_AUDIO.is_dir() else ROOT / "tests" / "data"
    )
    parser.add_argument("--clips", nargs="+", help="clip names (default: every English clip)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--token", default="bench-" + "k" * 40)
    args = parser.parse_args()

    manifest = {i["path"]: i for i in json.loads((args.audio / "manifest.json").read_text())["items"]}
    names = args.clips or [name for name, item in manifest.items() if item.get("language") == "en"]
    clips = [(args.audio / name, manifest[name]) for name in names]

    factor = machine_factor()
    offline = factor["machine_factor"]["offline_cpu_s_per_audio_s"]
    print(json.dumps(factor), flush=True)
    moonshine = machine_factor(model="moonshine")["machine_factor"]
    print(json.dumps({"moonshine_offline": moonshine}), flush=True)
    process, ws_url = start_server(args.token)
    base_url = ws_url.replace("ws://", "http://")
    try:
        post_file(base_url, args.token, clips[0][0], "moonshine")  # loads Moonshine before measuring
        for model in MODELS:
            started = time.monotonic()
            row = {"model": model, "mode": "file", "clips": len(clips)}
            row |= file_api(base_url, args.token, process.pid, clips, model)
            row["cpu_vs_machine_factor"] = round(row["cpu_s_per_audio_s"] / offline, 2)
            row["wall_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(row), flush=True)
            for clients in args.clients:
                row = {"model": model, "mode": "live 1x", "clients": clients}
                row |= live(stream_url(ws_url, args.token), process.pid, clips, model, clients)
                row["cpu_vs_machine_factor"] = round(row["cpu_s_per_audio_s"] / offline, 2)
                print(json.dumps(row), flush=True)
    finally:
        process.terminate()
        process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
