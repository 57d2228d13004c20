"""A real Chromium (Debian's package, headless) driven by Playwright, with a WAV file as its microphone."""

from __future__ import annotations

import os
import re
import shutil
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1] / "data"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")

try:
    from playwright.sync_api import (
        Browser,
        ConsoleMessage,
        Page,
        Playwright,
        WebSocket,
        expect,
        sync_playwright,
    )
except ImportError:  # pragma: no cover - the test extra installs it
    pytest.fail("playwright is not installed: scripts/test.sh installs the test extra", pytrace=False)

# The model shares two cores with the browser (and, in CI, with whatever else runs): wait generously.
expect.set_options(timeout=60_000)


def chromium_path() -> str:
    """Debian's Chromium (or $STREAMSCRIBE_CHROMIUM). Missing fails, never skips: CI must run these tests."""
    candidates = [os.environ.get("STREAMSCRIBE_CHROMIUM", ""), *CHROMIUM_CANDIDATES]
    candidates.append(shutil.which("chromium") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "Chromium not found: scripts/test.sh installs it (apt-get install -y chromium), "
        "or set STREAMSCRIBE_CHROMIUM to a Chromium binary",
        pytrace=False,
    )


def write_microphone_wav(path: Path, clip: str, before_s: float, after_s: float) -> Path:
    """``clip`` with silence around it, as the 16-bit PCM WAV Chromium's fake microphone plays."""
    with wave.open(str(DATA / clip)) as source:
        rate, channels = source.getframerate(), source.getnchannels()
        speech = np.frombuffer(source.readframes(source.getnframes()), dtype="<i2").reshape(-1, channels)
    silence = np.zeros((int(rate * before_s), channels), dtype="<i2")
    tail = np.zeros((int(rate * after_s), channels), dtype="<i2")
    with wave.open(str(path), "wb") as target:
        target.setnchannels(channels)
        target.setsampwidth(2)
        target.setframerate(rate)
        target.writeframes(np.concatenate([silence, speech, tail]).tobytes())
    return path


@pytest.fixture(scope="session")
def microphone_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Silence first (the page is still connecting), a long pause after (the server ends the segment).
    return write_microphone_wav(tmp_path_factory.mktemp("mic") / "microphone.wav", "short.wav", 1.0, 6.0)


@pytest.fixture(scope="package")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(playwright_driver: Playwright, microphone_wav: Path) -> Iterator[Browser]:
    """Headless Chromium whose microphone plays ``microphone_wav`` once (then silence), no prompts."""
    browser = playwright_driver.chromium.launch(
        executable_path=chromium_path(),
        headless=True,
        args=[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            # "%noloop": play the file once, then silence, instead of repeating it.
            f"--use-file-for-fake-audio-capture={microphone_wav}%noloop",
        ],
    )
    yield browser
    browser.close()


_TOKEN = re.compile(r'"token": ?"[^"]*"')
_MASKED_TOKEN = '"token":"•••"'


@dataclass
class PageWatch:
    """What a page did besides rendering: its requests, its script errors, and its socket frames (the
    first bytes of each: shown when the test fails, for what the page and the server said)."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)

    def frame(self, direction: str, payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            self.frames.append(f"{direction} binary {len(payload)} B: {payload[:8].hex()}")
        else:
            self.frames.append(f"{direction} {_TOKEN.sub(_MASKED_TOKEN, payload)[:160]}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Iterator[Any]:
    """Keeps each phase's report on the test, so that the page fixture knows whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def watch() -> PageWatch:
    return PageWatch()


@pytest.fixture
def page(browser: Browser, watch: PageWatch, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context (empty localStorage) with a desktop-size page; fails on script errors.
    When the test fails, the page's socket frames are printed (the report's captured output)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.on("request", lambda request: watch.requests.append(request.url))
    page.on("pageerror", lambda error: watch.errors.append(str(error)))

    def on_socket(socket: WebSocket) -> None:
        watch.frames.append(f"socket {socket.url.split('?')[0]}")
        socket.on("framesent", lambda payload: watch.frame("out", payload))
        socket.on("framereceived", lambda payload: watch.frame("in", payload))
        socket.on("close", lambda _: watch.frames.append("socket closed"))

    page.on("websocket", on_socket)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            watch.errors.append(message.text)

    page.on("console", on_console)
    yield page
    context.close()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        shown = watch.frames if len(watch.frames) <= 80 else [*watch.frames[:60], "…", *watch.frames[-20:]]
        print("The page's socket frames:", *shown, sep="\n  ")
    assert not watch.errors, f"the page logged errors: {watch.errors}"


@pytest.fixture
def save_screenshot() -> Callable[..., Path]:
    """Saves a PNG of a page under artifacts/ (kept by CI, ignored by git) and returns its path."""

    def save(page: Page, name: str, **kwargs: Any) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        page.screenshot(path=str(path), **kwargs)
        return path

    return save
