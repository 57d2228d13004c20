"""WER of telephone audio streamed as G.711 against the same speech at 16 kHz, through a real server.

    python bench/telephone_wer.py                        # tests/data/phone8k.wav (two sentences)
    python bench/telephone_wer.py --phone DEVSET/phone8k.wav --wideband DEVSET/long.wav \\
        --manifest DEVSET/manifest.json                  # the dev set's 18 s clip (five sentences)

The phone clip (make_devset.py) is the start of long.wav band-limited to 300-3400 Hz, resampled to 8 kHz
and mu-law quantised. Each row streams one version of it and prints its WER against the manifest's text:
``wideband_16k`` the same start of long.wav at 16 kHz (what the line took away: band, rate, companding);
``phone_at_16k`` the phone clip resampled to 16 kHz with soxr (the same band, sent at the engine's rate);
``phone_pcm16_8k`` the phone clip as 8 kHz pcm16 (resampled by the server); ``phone_mulaw_8k`` and
``phone_alaw_8k`` the phone clip encoded with G.711 (PyAV's pcm_mulaw / pcm_alaw) and sent in binary
frames at 8 kHz, as a telephony bridge would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import wave
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import soxr
from stream_bench import start_server, words

from streamscribe.client import stream_audio, stream_url

ROOT = Path(__file__).resolve().parent.parent


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as wav:
        raw = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        samples = raw.reshape(-1, wav.getnchannels()).mean(axis=1) / 32768.0
        return samples.astype(np.float32), wav.getframerate()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phone", type=Path, default=ROOT / "tests" / "data" / "phone8k.wav")
    parser.add_argument("--wideband", type=Path, default=ROOT / "tests" / "data" / "long.wav")
    parser.add_argument("--manifest", type=Path, default=ROOT / "tests" / "data" / "manifest.json")
    parser.add_argument("--url", help="existing server (default: start one)")
    parser.add_argument("--token", default="bench-" + "k" * 40)
    parser.add_argument("--speed", type=float, default=4.0, help="times real time")
    args = parser.parse_args()

    items = {item["path"]: item for item in json.loads(args.manifest.read_text())["items"]}
    reference = " ".join(words(items[args.phone.name]["reference"]))
    phone, phone_rate = read_wav(args.phone)
    wideband, wideband_rate = read_wav(args.wideband)
    assert (phone_rate, wideband_rate) == (8000, 16000)
    wideband = wideband[: len(phone) * 2]  # the same speech: the phone clip is long.wav's start
    versions: dict[str, tuple[np.ndarray, int, dict[str, Any], bool]] = {
        "wideband_16k": (wideband, 16000, {}, False),
        "phone_at_16k": (soxr.resample(phone, 8000, 16000).astype(np.float32), 16000, {}, False),
        "phone_pcm16_8k": (phone, 8000, {"audio_format": "pcm16"}, False),
        "phone_mulaw_8k": (phone, 8000, {"audio_format": "mulaw"}, True),
        "phone_alaw_8k": (phone, 8000, {"audio_format": "alaw"}, True),
    }
    process = None
    if args.url:
        url = args.url
    else:
        process, url = start_server(args.token)
    try:
        for name, (samples, rate, config, binary) in versions.items():
            result = asyncio.run(
                stream_audio(
                    stream_url(url, args.token), samples, rate, config=config, speed=args.speed, binary=binary
                )
            )
            hypothesis = " ".join(words(result.full_transcript or ""))
            row = {
                "version": name,
                "clip": args.phone.name,
                "seconds": round(len(samples) / rate, 2),
                "wer": round(jiwer.wer(reference, hypothesis), 4),
                "text": result.full_transcript,
            }
            print(json.dumps(row), flush=True)
    finally:
        if process:
            process.terminate()
            process.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
