"""The command line against a real running server and real files."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamscribe.offline import TimedText, render
from tests.audio_files import encode, file_name, wav_bytes, with_data_size
from tests.conftest import (
    DATA,
    RunningServer,
    ServerProcess,
    normalize_text,
    read_wav,
    word_error_rate,
    write_lock_held_elsewhere,
)


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamscribe.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_stream_command_prints_finals_and_full_transcript(server: RunningServer, tmp_path: Path) -> None:
    # A stereo 44.1 kHz copy: the client converts it to mono and the server resamples.
    import soxr

    from tests.conftest import read_wav

    mono, _ = read_wav(DATA / "short.wav")
    stereo = soxr.resample(mono, 16000, 44100)
    path = tmp_path / "stereo.wav"
    import wave

    import numpy as np

    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(44100)
        frames = (np.repeat(stereo[:, None], 2, axis=1) * 32767).astype("<i2")
        wav.writeframes(frames.tobytes())

    done = run_cli(
        "stream",
        "--audio",
        str(path),
        "--url",
        f"ws://127.0.0.1:{server.port}",
        "--speed",
        "0",
        "--sample-rate",
        "44100",
        env={"STREAMSCRIBE_API_KEY": server.api_key},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "Full transcript:"
    assert "quarterly report" in normalize_text(lines[-1])
    assert any(line.startswith("[") and "finance" in line.lower() for line in lines)


def test_stream_command_reports_server_errors(server: RunningServer) -> None:
    done = run_cli(
        "stream",
        "--duration",
        "1",
        "--url",
        f"ws://127.0.0.1:{server.port}",
        "--token",
        "nope",
        "--speed",
        "0",
    )
    assert done.returncode == 1
    assert "auth_failed" in done.stderr and "invalid API key" in done.stderr


def test_stream_command_reports_unreachable_server() -> None:
    done = run_cli("stream", "--duration", "1", "--url", "ws://127.0.0.1:9", "--token", "x")
    assert done.returncode == 1
    assert "cannot stream" in done.stderr


def test_transcribe_command_writes_subtitles(tmp_path: Path) -> None:
    out = tmp_path / "long.srt"
    done = run_cli("transcribe", str(DATA / "long.wav"), "--format", "srt", "-o", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert text.startswith("1\n00:00:00,")
    assert "quarterly report" in text.lower() and "receipt" in text.lower()


def test_transcribe_json_and_missing_file(tmp_path: Path) -> None:
    done = run_cli("transcribe", str(DATA / "short.wav"), "--format", "json")
    assert done.returncode == 0, done.stderr
    parsed = json.loads(done.stdout)
    assert "finance team" in normalize_text(parsed["text"])
    assert parsed["segments"][0]["start"] < 1.0
    missing = run_cli("transcribe", str(tmp_path / "nope.wav"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_transcribe_takes_the_servers_model_names() -> None:
    done = run_cli("transcribe", str(DATA / "short.wav"), "--model", "whisper-tiny.en")
    assert done.returncode == 0 and "finance team" in normalize_text(done.stdout), done.stderr
    unknown = run_cli("transcribe", str(DATA / "short.wav"), "--model", "gpt-4")
    assert unknown.returncode == 2 and "unknown model 'gpt-4'" in unknown.stderr


def test_transcribe_command_handles_a_minute_of_speech_without_pauses() -> None:
    # It once died with faster-whisper's "max_new_tokens ... exceeds the max_length" on this file.
    result = run_cli("transcribe", str(DATA / "continuous.wav"), "--format", "json", timeout=300)
    assert result.returncode == 0, result.stderr
    segments = json.loads(result.stdout)["segments"]
    assert len(segments) >= 3 and segments[-1]["end"] >= 55
    assert "the store will refund the jacket" in normalize_text(segments[-1]["text"])
    assert "Traceback" not in result.stderr


def test_models_command_lists_every_engine() -> None:
    done = run_cli("models")
    assert done.returncode == 0, done.stderr
    for name in ("whisper", "parakeet", "canary", "onnx", "mlx"):
        assert name in done.stdout
    assert re.search(r"moonshine\s*│\s*standard\s*│\s*en\s*│\s*yes\s*│", done.stdout), done.stdout


def test_transcribe_with_moonshine(moonshine_cache: Path) -> None:
    env = {"STREAMSCRIBE_CACHE_DIR": str(moonshine_cache)}
    done = run_cli("transcribe", str(DATA / "short.wav"), "--model", "moonshine", "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    parsed = json.loads(done.stdout)
    assert (
        word_error_rate("Please send the quarterly report to the finance team by Friday.", parsed["text"])
        <= 0.2
    )
    assert parsed["segments"][0]["start"] < 1.0


def test_serve_help_documents_every_setting() -> None:
    from streamscribe.config import describe_settings

    done = run_cli("serve", "--help")
    assert done.returncode == 0
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for variable, _, _ in describe_settings():
        assert variable in done.stdout
        assert variable in readme, f"{variable} missing from README"


def test_serve_with_a_missing_model_fails_fast_and_clearly() -> None:
    done = run_cli(
        "serve", "--port", "0", env={"STREAMSCRIBE_WHISPER__ENGLISH_MODEL": "/models/gone"}, timeout=30
    )
    assert done.returncode == 2
    assert "/models/gone" in done.stderr and "neither a bundled model" in done.stderr


def test_serve_refuses_a_weak_api_key() -> None:
    """The single key is the server's whole protection: a short one is refused (issue 16, item 7)."""
    done = run_cli("serve", "--port", "0", env={"STREAMSCRIBE_API_KEY": "change-me"}, timeout=30)
    assert done.returncode == 2
    assert "STREAMSCRIBE_API_KEY is too weak: 9 characters, at least 16" in done.stderr


def test_serve_reports_a_taken_wyoming_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = run_cli("serve", "--port", "0", "--wyoming-port", str(port), timeout=30)
    assert done.returncode == 2
    assert f"error: cannot listen for Wyoming on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_checks_the_trusted_proxies_flag() -> None:
    done = run_cli("serve", "--trusted-proxies", "10.0.0.0/8,proxy.local", timeout=30)
    assert done.returncode == 2 and "not an address or CIDR range: proxy.local" in done.stderr


def test_serve_warns_about_unknown_settings(server_process: Callable[..., ServerProcess]) -> None:
    """A misspelt variable is silently ignored by the settings: the server says so (issue 16, item 10)."""
    running = server_process(STREAMSCRIBE_REDIS_URL="redis://127.0.0.1:1/0", STREAMSCRIBE_PRELOAD="false")
    warnings = [line for line in running.log_lines() if "unknown setting" in line]
    assert len(warnings) == 1, running.log_lines()
    assert "STREAMSCRIBE_REDIS_URL" in warnings[0]
    assert "did you mean STREAMSCRIBE_SHARED_STORE__REDIS_URL" in warnings[0]


def test_transcribe_translates_with_word_timestamps() -> None:
    done = run_cli(
        "transcribe",
        str(DATA / "es.wav"),
        "--language",
        "es",
        "--task",
        "translate",
        "--format",
        "json",
        "--word-timestamps",
    )
    assert done.returncode == 0, done.stderr
    parsed = json.loads(done.stdout)
    assert "train" in normalize_text(parsed["text"]) and "hospital" in normalize_text(parsed["text"])
    words = parsed["segments"][0]["words"]
    assert words and all(w["start"] <= w["end"] for w in words)


def test_stream_command_translates(server: RunningServer) -> None:
    done = run_cli(
        "stream",
        "--audio",
        str(DATA / "es.wav"),
        "--language",
        "es",
        "--task",
        "translate",
        "--url",
        f"ws://127.0.0.1:{server.port}",
        "--speed",
        "0",
        env={"STREAMSCRIBE_API_KEY": server.api_key},
    )
    assert done.returncode == 0, done.stderr
    assert "hospital" in normalize_text(done.stdout.strip().splitlines()[-1])


# One container per line at 44.1 or 48 kHz, in stereo (the file API test covers every pair).
CLI_FORMATS = [
    ("wav", "pcm_s16le", 48000),
    ("flac", "flac", 44100),
    ("mp3", "libmp3lame", 48000),
    ("ogg", "libopus", 48000),
    ("ipod", "aac", 44100),
    ("webm", "vorbis", 44100),
]


@pytest.mark.parametrize(("container", "codec", "rate"), CLI_FORMATS, ids=[c for c, _, _ in CLI_FORMATS])
def test_transcribe_reads_stereo_files_in_every_container(
    tmp_path: Path, container: str, codec: str, rate: int
) -> None:
    path = tmp_path / file_name(container)
    path.write_bytes(encode(read_wav(DATA / "short.wav")[0], container, codec, rate, channels=2))
    done = run_cli("transcribe", str(path))
    assert done.returncode == 0, done.stderr
    reference = "Please send the quarterly report to the finance team by Friday."
    assert word_error_rate(reference, done.stdout) <= 0.1, done.stdout


def test_transcribe_of_empty_10_ms_and_lying_files(tmp_path: Path) -> None:
    speech = read_wav(DATA / "short.wav")[0]
    files = {
        "empty.wav": wav_bytes(np.zeros(0, np.float32)),
        "10ms.wav": wav_bytes(speech[16000:16160], channels=1),
        "claims-4GiB.wav": with_data_size(wav_bytes(speech), 0xFFFFFFFF),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name in ("empty.wav", "10ms.wav"):  # an empty transcript, not an error
        done = run_cli("transcribe", str(tmp_path / name))
        assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "", ""), name
    done = run_cli("transcribe", str(tmp_path / "claims-4GiB.wav"))
    assert done.returncode == 0 and "finance team" in normalize_text(done.stdout)


def test_transcribe_of_a_file_that_is_not_audio_says_so(tmp_path: Path) -> None:
    for name, data in (("nothing.wav", b""), ("notes.mp3", b"not audio" * 100)):
        path = tmp_path / name
        path.write_bytes(data)
        done = run_cli("transcribe", str(path))
        assert done.returncode == 2
        assert done.stderr.startswith(f"error: cannot read {path}: ") and done.stderr.count("\n") == 1
        assert "Errno" not in done.stderr and done.stderr.count(str(path)) == 1, done.stderr


def test_stream_command_prints_no_escape_sequences_a_server_sends() -> None:
    """A hostile server (or proxy) must not drive the user's terminal through transcript text."""
    from websockets.sync.server import serve

    hostile = "\x1b]0;pwned\x07clear\x1b[2J\x1b[31m red\u202e"

    def answer(connection: Any) -> None:
        json.loads(connection.recv())  # the config
        connection.send(json.dumps({"type": "status", "state": "ready", "model": "x"}))
        frame = {"type": "final", "text": hostile, "is_final": True, "model": "x", "segment_id": 0}
        connection.send(json.dumps({**frame, "start": 0.0, "end": 1.0, "language": "en"}))
        for message in connection:
            if json.loads(message)["type"] == "stop":
                connection.send(json.dumps({"type": "full_transcript", "text": hostile}))
                connection.close()

    with serve(answer, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        done = run_cli("stream", "--duration", "1", "--url", f"ws://127.0.0.1:{port}", "--token", "t" * 20)
        server.shutdown()
    assert done.returncode == 0, done.stderr
    assert "clear red" in done.stdout
    assert not any(unicodedata.category(ch)[0] == "C" and ch != "\n" for ch in done.stdout + done.stderr)


def test_keys_commands_on_a_database_another_process_is_writing(tmp_path: Path) -> None:
    env = {"STREAMSCRIBE_AUTH_MODE": "multi_user", "STREAMSCRIBE_DATA_DIR": str(tmp_path)}
    assert run_cli("keys", "create", "--user", "alice", env=env).returncode == 0
    with write_lock_held_elsewhere(tmp_path / "streamscribe.db"):
        listed = run_cli("keys", "list", env=env)  # a read: WAL lets it through
        busy = run_cli("keys", "create", "--user", "bob", env=env)  # a write: gives up after a short wait
    assert listed.returncode == 0 and "alice" in listed.stdout
    assert busy.returncode == 1
    assert "the database is busy" in busy.stderr and "Traceback" not in busy.stderr


def test_transcribe_diarize_labels_the_turns_in_json_and_subtitles(tmp_path: Path) -> None:
    out = tmp_path / "dialog.json"
    done = run_cli("transcribe", str(DATA / "dialog.wav"), "--diarize", "--format", "json", "-o", str(out))
    assert done.returncode == 0, done.stderr
    segments = json.loads(out.read_text())["segments"]
    assert [s["speaker"] for s in segments] == ["S1", "S2", "S1", "S2"], segments
    assert all(s["speakers"] == [s["speaker"]] for s in segments)
    pieces = [TimedText(s["start"], s["end"], s["text"], (), s["speaker"], (s["speaker"],)) for s in segments]
    srt, vtt = render(pieces, "srt"), render(pieces, "vtt")
    assert f"S1: {segments[0]['text']}\n" in srt and f"S2: {segments[1]['text']}\n" in srt
    assert f"<v S1>{segments[0]['text']}\n" in vtt and f"<v S2>{segments[1]['text']}\n" in vtt
    plain = render([TimedText(0.0, 1.0, "hi")], "json")
    assert "speaker" not in plain and "<v" not in render([TimedText(0.0, 1.0, "hi")], "vtt")
