"""A soak: clients stream a clip at real-time pace, pass after pass, for many minutes, while their sockets
are dropped now and then (no close frame) and resume; the server's memory must stay flat and no pass may
lose a sentence.

    python bench/soak.py                                   # 8 clients, 30 minutes, a drop every 5 minutes
    python bench/soak.py --minutes 2 --clients 2 --drop-every 1
    python bench/soak.py --allocator glibc                 # without jemalloc (a plain pip install)

Starts its own server (``streamscribe serve``). Each pass is one stream: the clip at real-time pace, then a
commit; no new pass starts after ``--minutes``. Every ``--drop-every`` minutes the next client in turn has
its TCP connection cut mid-pass and resumes it with its resume token (our client resends the audio after
the committed offset). Prints JSON lines: the server's RSS as it goes (also split: anonymous memory, the
heap; and touched pages of mapped files, libraries and models, which grow as new code paths run), one row
per pass (WER, whether every sentence of the clip got a final, reconnects), then a summary with RSS at
start (after the first pass of every client: the warm-up), half-time and end, and the verdicts: RSS flat
(end within 10 % of start),
every pass with every sentence final, WER not drifting (the last quarter's mean within 0.02 of the
first's), errors, reconnects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jiwer
from machine import ROOT
from stream_bench import read_wav, start_server, words

from streamscribe.client import StreamResult, stream_audio, stream_url

JEMALLOC = next(Path("/usr/lib").glob("*-linux-gnu/libjemalloc.so.2"), None)


def memory_mib(pid: int) -> dict[str, float]:
    """Resident memory of a process (Linux: /proc): all of it, its heap and other anonymous memory, and
    the pages of mapped files (libraries, models) it has touched so far."""
    fields = {"VmRSS": "rss_mib", "RssAnon": "anon_mib", "RssFile": "file_mib"}
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            found[fields[name]] = round(int(value.split()[0]) / 1024, 1)
    return found


@dataclass
class DropSchedule:
    """Every ``every`` seconds from the start, the next client in turn is dropped during its current pass."""

    start: float
    every: float
    clients: int
    dropped: int = 0  # drops handed out so far

    def drops_for(self, client: int, pass_start: float, pass_seconds: float) -> list[float]:
        """Audio offsets (seconds) in a pass starting now at which this client drops its socket."""
        due = self.start + (self.dropped + 1) * self.every
        if self.every <= 0 or self.dropped % self.clients != client:
            return []
        # The drop falls in this pass, or it has been overdue since the client's last pass started.
        offset = max(1.0, due - pass_start)
        if offset > pass_seconds - 2.0:
            return []
        self.dropped += 1
        return [offset]


@dataclass
class Soak:
    reference: str
    sentences: list[tuple[float, float]]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def judge(
        self, client: int, number: int, result: StreamResult, dropped: bool, seconds: float
    ) -> dict[str, Any]:
        finals = result.of_type("final")
        covered = all(any(f["start"] <= (a + b) / 2 <= f["end"] for f in finals) for a, b in self.sentences)
        text = result.full_transcript or ""
        row = {
            "client": client,
            "pass": number,
            "wer": round(jiwer.wer(" ".join(words(self.reference)), " ".join(words(text)) or "-"), 4),
            "every_sentence_final": covered,
            "finals": len(finals),
            "dropped": dropped,
            "wall_s": round(seconds, 1),  # the clip's length, plus the wait for the last final
            "reconnects": result.reconnects,
            "close": result.close_code,
            "error": result.error["error_type"] if result.error else None,
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row


async def client_loop(
    index: int, url: str, samples: Any, soak: Soak, drops: DropSchedule, until: float
) -> list[str]:
    """Passes until the deadline; returns the exceptions met (each ends its pass)."""
    problems: list[str] = []
    await asyncio.sleep(index * 1.3)  # real users do not start in lockstep
    number = 0
    seconds = len(samples) / 16000
    while time.monotonic() < until:
        began = time.monotonic()
        drop_at = drops.drops_for(index, began, seconds)
        try:
            result = await stream_audio(
                url, samples, 16000, speed=1.0, finish="commit", drop_at=drop_at, timeout=600
            )
        except Exception as exc:  # a pass that could not even run is an error of the soak
            problems.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1)
            continue
        soak.judge(index, number, result, bool(drop_at), time.monotonic() - began)
        number += 1
    return problems


async def sample_memory(
    pid: int, every: float, samples: list[tuple[float, dict[str, float]]], began: float
) -> None:
    while True:
        samples.append((time.monotonic() - began, memory_mib(pid)))
        print(json.dumps({"t_s": round(samples[-1][0], 1), **samples[-1][1]}), flush=True)
        await asyncio.sleep(every)


def memory_at(samples: list[tuple[float, dict[str, float]]], at: float) -> dict[str, float]:
    return min(samples, key=lambda sample: abs(sample[0] - at))[1]


async def soak(args: argparse.Namespace, pid: int, base: str, token: str) -> dict[str, Any]:
    manifest = json.loads((args.clip.parent / "manifest.json").read_text())
    item = next(i for i in manifest["items"] if i["path"] == args.clip.name)
    samples = read_wav(args.clip)
    state = Soak(item["reference"], [(s["start"], s["end"]) for s in item["segments"]])
    began = time.monotonic()
    until = began + args.minutes * 60
    drops = DropSchedule(began, args.drop_every * 60, args.clients)
    memory: list[tuple[float, dict[str, float]]] = []
    sampler = asyncio.create_task(sample_memory(pid, args.rss_every, memory, began))
    url = stream_url(base, token)
    problems = await asyncio.gather(
        *(client_loop(i, url, samples, state, drops, until) for i in range(args.clients))
    )
    sampler.cancel()
    memory.append((time.monotonic() - began, memory_mib(pid)))
    ended = memory[-1][0]
    # Warm-up: until every client has finished its first pass (engine, VAD and buffers all allocated).
    warm = len(samples) / 16000 + args.clients * 1.3 + 5
    points = {
        "start": memory_at(memory, warm),
        "half": memory_at(memory, (warm + ended) / 2),
        "end": memory[-1][1],
    }
    start, end = points["start"]["rss_mib"], points["end"]["rss_mib"]
    figures = {
        kind: {point: found[kind] for point, found in points.items()}
        for kind in ("rss_mib", "anon_mib", "file_mib")
    }
    figures["rss_mib"]["max"] = max(found["rss_mib"] for _, found in memory)
    rows = state.rows
    wers = [row["wer"] for row in rows]
    quarter = max(1, len(wers) // 4)
    errors = [row for row in rows if row["error"] or row["close"] != 1000]
    details = [f"client {r['client']} pass {r['pass']}: {r['error'] or r['close']}" for r in errors]
    drift_ok = bool(wers) and statistics.fmean(wers[-quarter:]) <= statistics.fmean(wers[:quarter]) + 0.02
    return {
        "summary": {
            "allocator": args.allocator,
            "clients": args.clients,
            "minutes": round(ended / 60, 2),
            "clip": args.clip.name,
            "passes": len(rows),
            **figures,
            "rss_flat": abs(end - start) <= 0.1 * start,
            "passes_every_sentence_final": sum(row["every_sentence_final"] for row in rows),
            "all_sentences_final": all(row["every_sentence_final"] for row in rows),
            "wer_per_pass": wers,
            "wer_first_quarter": round(statistics.fmean(wers[:quarter]), 4) if wers else None,
            "wer_last_quarter": round(statistics.fmean(wers[-quarter:]), 4) if wers else None,
            "wer_drift_ok": drift_ok,
            "errors": len(errors) + sum(len(p) for p in problems),
            "error_details": details + [p for found in problems for p in found],
            "drops": sum(row["dropped"] for row in rows),
            "reconnects": sum(row["reconnects"] for row in rows),
        }
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="how long clients start new passes")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--drop-every", type=float, default=5.0, help="minutes between drops (0: none)")
    parser.add_argument("--clip", type=Path, default=ROOT / "tests" / "data" / "long.wav")
    parser.add_argument("--rss-every", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument(
        "--allocator",
        choices=["jemalloc", "glibc"],
        default="jemalloc" if JEMALLOC else "glibc",
        help="the server's malloc: jemalloc, preloaded as in the Docker image (the default where it is "
        "installed: Debian's libjemalloc2), or glibc's",
    )
    args = parser.parse_args()
    if args.allocator == "jemalloc":
        if JEMALLOC is None:
            parser.error("jemalloc is not installed (Debian: apt-get install libjemalloc2)")
        os.environ["LD_PRELOAD"] = str(JEMALLOC)  # the server's environment (start_server)
    token = "soak-" + secrets.token_hex(20)
    process, base = start_server(token)
    try:
        report = asyncio.run(soak(args, process.pid, base, token))
    finally:
        process.terminate()
        process.wait(timeout=60)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
