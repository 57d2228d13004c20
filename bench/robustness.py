"""Every clip of a folder through a real server, live at real-time pace and through the file API.

    python bench/robustness.py                          # ../shared/audio (its manifest.json)
    python bench/robustness.py --audio tests/data --speed 2

Starts its own server, prints the machine factor first (bench/machine.py), then one JSON row per clip:
the file API's status and WER, the live stream's close code and WER, their ratio, and whether any final
wrote text twice (a decoder's loop). Then a summary: 5xx answers, tracebacks in the server's log, finals
with repeated text, and English clips whose streamed WER is over 1.15 times the file API's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import jiwer
import numpy as np
from machine import ROOT, machine_factor
from stream_bench import start_server, words

from streamscribe.audio import load_audio_file
from streamscribe.client import stream_audio, stream_url
from streamscribe.engines.repetition import find_repeated_run, spoken_words


def wer(reference: str, hypothesis: str) -> float | None:
    expected = " ".join(words(reference))
    if not expected:
        return None  # silence or noise: any text at all is wrong
    return round(jiwer.wer(expected, " ".join(words(hypothesis))), 4)


def through_file_api(base: str, token: str, path: Path, language: str) -> tuple[int, str]:
    with path.open("rb") as audio:
        response = httpx.post(
            f"{base}/v1/audio/transcriptions",
            headers={"Authorization": f"Bearer {token}"},
            files={"file": (path.name, audio)},
            data={"model": "whisper-1", "language": language, "response_format": "json"},
            timeout=600,
        )
    text = response.json().get("text", "") if response.status_code == 200 else response.text
    return response.status_code, text


async def live(url: str, path: Path, rate: int, language: str, speed: float) -> dict[str, Any]:
    samples = load_audio_file(path, rate)
    result = await stream_audio(url, samples, rate, config={"language": language}, speed=speed, timeout=600)
    finals = result.of_type("final")
    return {
        "close": result.close_code,
        "text": result.full_transcript or "",
        "repeats": [f["text"] for f in finals if find_repeated_run(spoken_words(f["text"]))],
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def unbroken(url: str, path: Path, reference: str, minutes: float, pid: int) -> dict[str, Any]:
    """``minutes`` of speech that never pauses, sent as fast as the server takes it: the server's memory
    at each final, and whether every pass of the clip came back."""
    clip = load_audio_file(path)
    passes = max(1, round(minutes * 60 * 16000 / len(clip)))
    memory: list[float] = []

    def on_frame(received: Any) -> None:
        if received.frame.get("type") == "final":
            memory.append(rss_mb(pid))

    result = await stream_audio(
        url, np.tile(clip, passes), 16000, speed=0, frame_seconds=0.5, on_frame=on_frame, timeout=1200
    )
    finals = result.of_type("final")
    return {
        "clip": f"{path.name} x{passes} ({passes * len(clip) / 16000 / 60:.1f} min, no pause)",
        "live_close": result.close_code,
        "live_wer": wer(" ".join([reference] * passes), result.full_transcript or ""),
        "finals": len(finals),
        "longest_final_s": round(max((f["end"] - f["start"] for f in finals), default=0.0), 2),
        "finals_with_repeats": sum(bool(find_repeated_run(spoken_words(f["text"]))) for f in finals),
        "rss_mb_first_tenth_last": [round(memory[i], 1) for i in (0, len(memory) // 10, -1)]
        if memory
        else [],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--audio", type=Path, default=ROOT.parent / "shared" / "audio")
    parser.add_argument("--speed", type=float, default=1.0, help="times real time for the live streams")
    parser.add_argument("--parallel", type=int, default=3, help="live streams at once")
    parser.add_argument("--token", default="bench-" + "k" * 40)
    parser.add_argument("--unbroken-minutes", type=float, default=10.0, help="0: skip that stream")
    args = parser.parse_args()

    print(json.dumps(machine_factor()), flush=True)
    items = json.loads((args.audio / "manifest.json").read_text())["items"]
    log = Path(tempfile.mkdtemp(prefix="robustness-")) / "server.log"
    with log.open("wb") as server_stderr:
        process, ws_base = start_server(args.token, stderr=server_stderr)
    base = ws_base.replace("ws://", "http://")
    rows: list[dict[str, Any]] = []
    try:
        files = {
            item["path"]: through_file_api(
                base, args.token, args.audio / item["path"], item.get("language") or "en"
            )
            for item in items
        }

        async def streams() -> list[dict[str, Any]]:
            gate = asyncio.Semaphore(args.parallel)

            async def one(item: dict[str, Any]) -> dict[str, Any]:
                async with gate:
                    rate = item.get("sample_rate", 16000)
                    return await live(
                        stream_url(ws_base, args.token),
                        args.audio / item["path"],
                        rate,
                        item.get("language") or "en",
                        args.speed,
                    )

            return await asyncio.gather(*(one(item) for item in items))

        for item, stream in zip(items, asyncio.run(streams()), strict=True):
            status, file_text = files[item["path"]]
            file_wer, live_wer = wer(item["reference"], file_text), wer(item["reference"], stream["text"])
            ratio = None
            if file_wer is not None and live_wer is not None:
                ratio = round((live_wer + 0.01) / (file_wer + 0.01), 2)  # +1 point: 0 vs 0.5% is no 50x
            row = {
                "clip": item["path"],
                "language": item.get("language"),
                "file_status": status,
                "file_wer": file_wer,
                "file_words": len(words(file_text)) if status == 200 else None,
                "live_close": stream["close"],
                "live_wer": live_wer,
                "live_words": len(words(stream["text"])),
                "live_to_file_wer": ratio,
                "finals_with_repeats": len(stream["repeats"]),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        continuous = next((i for i in items if i["path"] == "continuous.wav"), None)
        if continuous and args.unbroken_minutes:
            long_run = asyncio.run(
                unbroken(
                    stream_url(ws_base, args.token),
                    args.audio / "continuous.wav",
                    continuous["reference"],
                    args.unbroken_minutes,
                    process.pid,
                )
            )
            print(json.dumps(long_run), flush=True)
    finally:
        process.terminate()
        process.wait(timeout=30)
    server_log = log.read_text(errors="replace")
    english_over = [r["clip"] for r in rows if r["language"] == "en" and (r["live_to_file_wer"] or 0) > 1.15]
    summary = {
        "clips": len(rows),
        "http_5xx": sum(r["file_status"] >= 500 for r in rows),
        "streams_not_closed_1000": sum(r["live_close"] != 1000 for r in rows),
        "tracebacks_in_server_log": len(re.findall(r"Traceback \(most recent call last\)", server_log)),
        "finals_with_repeats": sum(r["finals_with_repeats"] for r in rows),
        "english_clips_live_wer_over_1.15x_file": english_over,
        "server_log": str(log),
    }
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
