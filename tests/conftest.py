"""Shared fixtures: real servers on loopback, real audio clips, a streaming helper."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from streamscribe.client import StreamResult, stream_audio, stream_url
from streamscribe.config import Settings
from streamscribe.server.app import create_app
from streamscribe.server.serving import GracefulServer, uvicorn_config

DATA = Path(__file__).parent / "data"
TEST_KEY = "test-key-" + "x" * 40


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and rate of a 16-bit PCM WAV."""
    with wave.open(str(path)) as wav:
        raw = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        samples = raw.reshape(-1, wav.getnchannels()).mean(axis=1) / 32768.0
        return samples.astype(np.float32), wav.getframerate()


@pytest.fixture(scope="session")
def manifest() -> dict[str, dict[str, Any]]:
    items = json.loads((DATA / "manifest.json").read_text())["items"]
    return {item["path"]: item for item in items}


@pytest.fixture(scope="session")
def clip() -> Callable[[str], np.ndarray]:
    def load(name: str) -> np.ndarray:
        samples, rate = read_wav(DATA / name)
        assert rate == 16000
        return samples

    return load


_WORD = re.compile(r"[a-z0-9']+")
_NUMBERS = {"20": "twenty", "2": "two", "4": "four"}


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, the few digits Whisper writes spelled out (as in the references)."""
    return " ".join(_NUMBERS.get(w, w) for w in _WORD.findall(text.lower()))


def word_error_rate(reference: str, text: str) -> float:
    """WER of ``text`` against ``reference``, both normalised; an empty text is every word missed."""
    import jiwer

    return float(jiwer.wer(normalize_text(reference), normalize_text(text) or "-"))


@dataclass
class RunningServer:
    """A real streamscribe server in this process, on a loopback port."""

    settings: Settings
    port: int
    api_key: str
    _server: GracefulServer
    _thread: threading.Thread

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, token: str | None = None) -> str:
        return stream_url(f"ws://127.0.0.1:{self.port}", token if token is not None else self.api_key)

    def stream(self, samples: np.ndarray, rate: int = 16000, **kwargs: Any) -> StreamResult:
        """Stream samples through the real socket and return everything the server said."""
        token = kwargs.pop("token", None)
        return asyncio.run(stream_audio(self.ws_url(token), samples, rate, **kwargs))

    @property
    def app(self) -> Any:
        return self._server.config.app

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def start_server(tmp_path: Path, **overrides: Any) -> RunningServer:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    overrides.setdefault("cache_dir", tmp_path / "cache")
    settings = Settings(api_key=TEST_KEY, port=port, **overrides)
    app = create_app(settings, TEST_KEY)
    server = GracefulServer(uvicorn_config(settings, app, log_level="info"), app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.05)
    return RunningServer(settings, port, TEST_KEY, server, thread)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One real server on the bundled tiny.en model, shared by the tests that need defaults."""
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def moonshine_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for every Moonshine test: the shipped model is converted into it once."""
    return tmp_path_factory.mktemp("moonshine-cache")


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """A server with custom settings, stopped after the test."""
    started: list[RunningServer] = []

    def make(**overrides: Any) -> RunningServer:
        started.append(start_server(tmp_path, **overrides))
        return started[-1]

    yield make
    for running in started:
        running.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A ``streamscribe serve`` process; its standard error is in ``log``."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def log_lines(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if line.strip()]


def start_process(tmp_path: Path, *args: str, **env: str) -> ServerProcess:
    """``streamscribe serve`` (with ``args``) in a process of its own on a loopback port, ready when this
    returns."""
    port = free_port()
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "streamscribe.cli", "serve", "--port", str(port), *args],
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "STREAMSCRIBE_API_KEY": TEST_KEY,
            "STREAMSCRIBE_CACHE_DIR": str(tmp_path / "cache"),
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return ServerProcess(process, port, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready")


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Starts server processes with extra environment variables; kills them after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, **env: str) -> ServerProcess:
        started.append(start_process(tmp_path, *args, **env))
        return started[-1]

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


@pytest.fixture
def captured_logs() -> Iterator[list[str]]:
    """Every log line written while the test runs (all loggers), formatted as a handler would."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    # uvicorn's loggers do not propagate to the root logger, so listen on them directly.
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.access", "uvicorn.error")]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield lines
    for logger, level in zip(loggers, previous, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextlib.contextmanager
def write_lock_held_elsewhere(database: Path) -> Iterator[None]:
    """Another process holds the SQLite file's write lock (BEGIN EXCLUSIVE) until the block ends."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; db = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "db.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()",
            str(database),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline() == b"locked\n"
        yield
    finally:
        holder.stdin.close()  # the holder exits, and its lock goes with it
        holder.wait(timeout=10)
