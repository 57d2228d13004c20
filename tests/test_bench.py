"""The benchmarks print this machine's offline cost before anything else, so their numbers compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA

ROOT = Path(__file__).resolve().parents[1]


def test_session_cost_prints_the_machine_factor_first_and_its_cost_as_a_ratio_to_it() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "session_cost.py"), "--clip", str(DATA / "short.wav")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    first, *rest = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    factor = first["machine_factor"]
    assert factor["engine"] == "whisper-tiny.en" and factor["clip"] == "short.wav"
    assert 0 < factor["offline_cpu_s_per_audio_s"] < 1
    (result,) = rest
    assert result["cpu_times_offline"] > 0
    assert (
        abs(result["cpu_times_offline"] * factor["offline_cpu_s_per_audio_s"] - result["cpu_s_per_audio_s"])
        < 0.01
    )


def test_the_capacity_search_finds_the_largest_load_that_keeps_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from stream_bench import capacity_search

    def row(clients: int) -> dict[str, object]:  # this server keeps up with 13 streams, not 14
        kept = clients if clients <= 13 else clients - 1
        return {"clients": clients, "kept_up": f"{kept}/{clients}", "emission_delay_p90_s": 1.0}

    probed: list[int] = []

    def run(clients: int) -> dict[str, object]:
        probed.append(clients)
        return row(clients)

    found = capacity_search(run, [row(1), row(4), row(8)])
    assert found is not None and 12 <= found["clients"] <= 13  # to within an eighth
    assert probed[0] == 12 and len(probed) <= 5
    slow = {"clients": 4, "kept_up": "4/4", "emission_delay_p90_s": 1.6}  # kept up, but too late
    assert capacity_search(run, [row(1), slow]) is not None
    assert probed[-1] < 4


def test_a_repeated_clip_keeps_its_sentences_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from stream_bench import load_clip, repeated

    talk = load_clip(DATA / "continuous.wav", DATA / "manifest.json")
    looped = repeated(talk, 180.0)
    assert abs(len(looped.samples) / 16000 - looped.segments[-1]["end"] - 0.1) < 0.01
    assert 170 < looped.segments[-1]["end"] <= 180
    length = len(talk.samples) / 16000
    assert looped.segments[len(talk.segments)]["start"] == talk.segments[0]["start"] + length
