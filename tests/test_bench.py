"""The benchmarks print this machine's offline cost before anything else, so their numbers compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
