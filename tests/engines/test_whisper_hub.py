"""Whisper models named as on the Hugging Face Hub: taken from its cache, and a clear, quick refusal when a
name is not cached and the hub is offline (HF_HUB_OFFLINE=1, as in the tests)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from streamscribe.engines.bundled import BUNDLED_WHISPER_MODELS
from tests.conftest import DATA, word_error_rate
from tests.test_cli import run_cli

REPO = "streamscribe-test/faster-whisper-tiny.en"


def fake_hub_cache(hf_home: Path) -> None:
    """``REPO`` in the Hugging Face cache layout (refs/main -> snapshots/<commit>/...), its files links to
    the bundled tiny.en."""
    repo = hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    bundled = BUNDLED_WHISPER_MODELS["tiny.en"].locate(hf_home)
    for file in bundled.iterdir():
        (snapshot / file.name).symlink_to(file)


def test_a_hub_name_not_in_the_cache_fails_at_start_naming_the_setting(tmp_path: Path) -> None:
    started = time.monotonic()
    done = run_cli(
        "serve",
        "--port",
        "0",
        env={"HF_HOME": str(tmp_path), "STREAMSCRIBE_WHISPER__ENGLISH_MODEL": "small.en"},
        timeout=60,
    )
    assert done.returncode == 2
    assert "STREAMSCRIBE_WHISPER__ENGLISH_MODEL" in done.stderr and "'small.en'" in done.stderr
    assert "HF_HUB_OFFLINE=1" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 30


def test_a_cached_hub_model_is_used(tmp_path: Path) -> None:
    fake_hub_cache(tmp_path)
    env = {"HF_HOME": str(tmp_path), "STREAMSCRIBE_WHISPER__ENGLISH_MODEL": REPO}
    models = run_cli("models", env=env)
    assert models.returncode == 0 and "whisper" in models.stdout and "not in the" not in models.stdout
    done = run_cli("transcribe", str(DATA / "short.wav"), "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    text = json.loads(done.stdout)["text"]
    assert word_error_rate("Please send the quarterly report to the finance team by Friday.", text) <= 0.2
    missing = run_cli("transcribe", str(DATA / "short.wav"), env={**env, "HF_HOME": str(tmp_path / "empty")})
    assert missing.returncode == 2 and REPO in missing.stderr
