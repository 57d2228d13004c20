"""What `pip install streamscribe` gives: the wheel, installed without extras into a fresh venv with its
dependencies from the package index, serves a stream. Nothing that scripts/install.sh adds may be needed.

Slow (a minute or two: the install into the new venv), so it is the only test of its kind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import Any

import httpx
import jiwer

from tests.conftest import DATA, free_port, normalize_text

ROOT = Path(__file__).resolve().parents[1]
KEY = "packaging-test-key-" + "p" * 32


def _run(command: list[str | Path], timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def _build_wheel(work: Path) -> Path:
    """A wheel of a copy of the project (an in-tree build would leave build/ in the checkout)."""
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = work / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", dist, source], timeout=300)
    (wheel,) = dist.glob("streamscribe-*.whl")
    return wheel


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would let the new venv see our checkout or our venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


def test_wheel_installed_without_extras_serves_a_stream(tmp_path: Path, manifest: dict[str, Any]) -> None:
    wheel = _build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python, command = env_dir / "bin" / "python", env_dir / "bin" / "streamscribe"
    started = time.monotonic()
    _run([python, "-m", "pip", "install", "--quiet", wheel], timeout=900, env=_clean_env())
    install_seconds = time.monotonic() - started
    located = _run([python, "-c", "import streamscribe; print(streamscribe.__file__)"], 60, cwd=tmp_path)
    assert Path(located.stdout.strip()).is_relative_to(env_dir), "imported a streamscribe outside the venv"

    port = free_port()
    env = _clean_env(
        HF_HUB_OFFLINE="1",
        STREAMSCRIBE_API_KEY=KEY,
        STREAMSCRIBE_CACHE_DIR=str(tmp_path / "cache"),
        STREAMSCRIBE_DATA_DIR=str(tmp_path / "data"),
    )
    log = tmp_path / "serve.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [command, "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"serve exited ({server.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"serve never became ready:\n{log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)

        streamed = subprocess.run(
            [command, "stream", "--audio", DATA / "short.wav", "--url", f"ws://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "STREAMSCRIBE_API_KEY": KEY},
            cwd=tmp_path,
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert streamed.returncode == 0, f"{streamed.stdout}\n{streamed.stderr}\nserver:\n{log.read_text()}"
    transcript = streamed.stdout.split("Full transcript:", 1)[1].strip()
    reference = normalize_text(manifest["short.wav"]["reference"])
    assert jiwer.wer(reference, normalize_text(transcript)) <= 0.1, (transcript, install_seconds)
