"""The browser page, in a real headless Chromium against a real server on the bundled model."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Page, WebSocketRoute, expect

from .conftest import DATA, PageWatch

WEB_DIR = Path(__file__).resolve().parents[2] / "src" / "streamscribe" / "web"
SHORT_CLIP_WORDS = ("quarterly", "report", "finance", "team", "friday")

# Records, in the page, every change of the partial line and of the finals list, with its time.
OBSERVE_TRANSCRIPT = """() => {
  window.__transcriptChanges = [];
  const record = (kind, element) => window.__transcriptChanges.push(
    {kind, text: element.textContent, at: performance.now()});
  const watch = (kind, element) => new MutationObserver(() => record(kind, element))
    .observe(element, {childList: true, characterData: true, subtree: true});
  watch("partial", document.getElementById("partial"));
  watch("final", document.getElementById("finals"));
}"""


def open_page(page: Page, base_url: str, key: str | None = None) -> None:
    page.goto(base_url + "/")
    expect(page.locator("#engines tr[data-model]").first).to_be_attached()
    if key is not None:
        page.fill("#api-key", key)
        page.click("#key-save")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def test_page_and_its_files_are_served_from_the_package(server: Any) -> None:
    index = httpx.get(server.base_url + "/")
    assert index.status_code == 200
    assert index.headers["content-type"].startswith("text/html")
    policy = index.headers["content-security-policy"]
    assert "default-src 'self'" in policy
    # Page scripts may open sockets to this server only ('self' covers its ws: and wss:).
    assert "connect-src 'self';" in policy and "ws:" not in policy
    assert index.headers["x-content-type-options"] == "nosniff"
    # Nothing external: every src/href is relative to this server.
    references = re.findall(r'(?:src|href)="([^"]+)"', index.text)
    assert references and all(not re.match(r"^[a-z]+:", ref) or ref.startswith("#") for ref in references)
    for path in sorted(WEB_DIR.iterdir()):
        response = httpx.get(f"{server.base_url}/web/{path.name}")
        assert response.status_code == 200, path.name
        assert response.headers["cache-control"] == "no-cache", path.name
        if path.suffix == ".js":
            # Module scripts and worklets load only with a JavaScript MIME type.
            assert "javascript" in response.headers["content-type"], path.name
    # The API keeps its routes.
    assert httpx.get(server.base_url + "/healthz").json() == {"status": "ok"}


def test_microphone_session_shows_partials_then_finals_and_the_full_transcript(
    page: Page, server: Any, watch: PageWatch, save_screenshot: Callable[..., Path]
) -> None:
    """The PCM path: float32 from the AudioWorklet, base64 in JSON audio frames."""
    open_page(page, server.base_url, server.api_key)
    page.select_option("#audio-encoding", "pcm")
    page.evaluate(OBSERVE_TRANSCRIPT)

    page.click("#start")
    expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
    expect(page.locator("#active-model")).to_have_text("whisper-tiny.en")
    expect(page.locator("#partial")).not_to_be_empty()
    save_screenshot(page, "web-live.png")
    expect(page.locator("#finals")).to_contain_text("friday", ignore_case=True)
    assert page.locator("#finals .final time").first.inner_text().startswith("00:0")

    page.click("#stop")
    expect(page.locator("#full-state")).to_have_text("complete")
    expect(page.locator("#connection")).to_have_attribute("data-state", "closed")
    full = page.input_value("#full")
    assert set(SHORT_CLIP_WORDS) <= set(words(full)), full
    assert page.locator("#partial").is_hidden()
    expect(page.locator("#copy")).to_be_enabled()
    expect(page.locator("#download")).to_be_enabled()

    changes = page.evaluate("window.__transcriptChanges")
    first_partial = next(c["at"] for c in changes if c["kind"] == "partial" and c["text"].strip())
    first_final = next(c["at"] for c in changes if c["kind"] == "final" and c["text"].strip())
    assert first_partial < first_final, changes

    # The debug panel shows the exchange: config out, partials and finals in, commit out, full transcript in.
    page.click("#debug summary")
    types = page.eval_on_selector_all(
        "#debug-log li", "items => items.map(i => i.dataset.direction + ':' + i.dataset.type)"
    )
    for expected in ("out:config", "out:audio", "in:partial", "in:final", "out:commit", "in:full_transcript"):
        assert expected in types, types
    assert server.api_key not in page.inner_text("#debug")
    save_screenshot(page, "web-finished.png", full_page=True)

    # Everything the page loaded came from this server.
    assert all(url.startswith((server.base_url, "data:", "blob:")) for url in watch.requests), watch.requests
    # The microphone went through the AudioWorklet (resampled in it to 16 kHz).
    expect(page.locator("#debug-log li[data-type=note]").first).to_contain_text("sending 16000 Hz")


def test_microphone_goes_as_opus_in_binary_frames_by_default(page: Page, server: Any) -> None:
    """Chromium records Opus (WebM), so the page sends it: MediaRecorder's slices as binary frames, at
    about 32 kbit/s instead of 680 kbit/s, and the server's text is as good."""
    sent: list[str | bytes] = []
    page.on("websocket", lambda socket: socket.on("framesent", lambda frame: sent.append(frame)))
    open_page(page, server.base_url, server.api_key)
    expect(page.locator("#audio-encoding")).to_have_value("opus")
    page.click("#start")
    expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
    started = time.monotonic()
    expect(page.locator("#finals")).to_contain_text("friday", ignore_case=True)
    page.click("#stop")
    seconds = time.monotonic() - started
    expect(page.locator("#full-state")).to_have_text("complete")
    assert set(SHORT_CLIP_WORDS) <= set(words(page.input_value("#full")))

    configs = [json.loads(frame) for frame in sent if isinstance(frame, str) and '"config"' in frame]
    assert [config["audio_format"] for config in configs] == ["opus"]
    audio = [frame for frame in sent if isinstance(frame, bytes)]
    # (Chromium may slice the header itself: its first frame may be one byte.)
    assert b"".join(audio[:4])[:4] == b"\x1a\x45\xdf\xa3", "a WebM stream, from its EBML header"
    assert not [frame for frame in sent if isinstance(frame, str) and '"audio"' in frame]
    kbit_per_second = sum(len(frame) for frame in audio) * 8 / seconds / 1000
    assert kbit_per_second < 64, kbit_per_second  # base64 float32 would be 680
    expect(page.locator("#debug-audio")).to_contain_text("KiB of Opus")
    page.click("#debug summary")
    expect(page.locator("#debug-log li[data-type=note]").first).to_contain_text("sending Opus")


def test_clear_during_a_session_resets_the_server_transcript(page: Page, server: Any) -> None:
    open_page(page, server.base_url, server.api_key)
    page.click("#start")
    # The first partial comes a second or more into the sentence, after "Please" was said.
    expect(page.locator("#partial")).not_to_be_empty()
    page.click("#clear")
    expect(page.locator("#debug-log li[data-direction=out][data-type=reset]")).to_have_count(1)
    expect(page.locator("#debug-log li[data-direction=in][data-type=status]").last).to_contain_text('"reset"')
    page.click("#stop")
    expect(page.locator("#connection")).to_have_attribute("data-state", "closed")
    # What was said before Clear is gone from the server's transcript too.
    full = page.input_value("#full")
    assert "please" not in words(full), full


def test_dropped_file_is_transcribed_and_can_be_copied_and_downloaded(
    page: Page, server: Any, tmp_path: Path
) -> None:
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    open_page(page, server.base_url, server.api_key)
    clip = base64.b64encode((DATA / "short.wav").read_bytes()).decode()
    drop = page.evaluate_handle(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "short.wav", {type: "audio/wav"}));
            return transfer;
        }""",
        clip,
    )
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": drop})
    expect(page.locator("#full-state")).to_have_text("complete")
    expect(page.locator("#finals .divider")).to_have_count(0)

    page.click("#copy")
    expect(page.locator("#copy")).to_have_text("Copied")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert set(SHORT_CLIP_WORDS) <= set(words(copied)), copied

    with page.expect_download() as download_info:
        page.click("#download")
    download = download_info.value
    assert download.suggested_filename.startswith("transcript-")
    assert download.suggested_filename.endswith(".txt")
    target = tmp_path / download.suggested_filename
    download.save_as(target)
    assert target.read_text().strip() == page.input_value("#full").strip() == copied.strip()


def test_wrong_key_is_rejected_with_a_clear_message(page: Page, server: Any) -> None:
    open_page(page, server.base_url, "not-the-key")
    page.click("#start")
    alert = page.locator(".notice.error")
    expect(alert).to_contain_text("rejected the API key")
    expect(alert).to_contain_text("missing or invalid API key")
    expect(page.locator("#api-key")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#connection")).to_have_attribute("data-state", "error")
    expect(page.locator("#start")).to_be_enabled()
    assert page.evaluate("localStorage.getItem('streamscribe.apiKey')") == "not-the-key"


def test_key_is_saved_and_hidden_until_shown(page: Page, server: Any) -> None:
    open_page(page, server.base_url, server.api_key)
    expect(page.locator("#api-key")).to_have_attribute("type", "password")
    page.click("#key-toggle")
    expect(page.locator("#api-key")).to_have_attribute("type", "text")
    expect(page.locator("#key-toggle")).to_have_attribute("aria-pressed", "true")
    page.reload()
    expect(page.locator("#api-key")).to_have_value(server.api_key)


def test_quota_close_is_explained(page: Page, server: Any) -> None:
    """4003 is not sent by this server yet (multi-user work); a stand-in socket plays the server's part."""

    def fake_server(socket: WebSocketRoute) -> None:
        def on_message(message: str | bytes) -> None:
            if isinstance(message, str) and json.loads(message)["type"] == "config":
                socket.send(json.dumps({"type": "status", "state": "configured", "model": "whisper"}))
                socket.send(json.dumps({"type": "status", "state": "ready", "model": "whisper-tiny.en"}))
                error = {
                    "type": "error",
                    "error_type": "quota_exceeded",
                    "fatal": True,
                    "message": "daily quota used",
                }
                socket.send(json.dumps(error))
                socket.close(code=4003, reason="quota")

        socket.on_message(on_message)

    page.route_web_socket(re.compile(r".*/api/v1/audio/stream/transcribe.*"), fake_server)
    open_page(page, server.base_url, server.api_key)
    page.click("#start")
    alert = page.locator(".notice.error")
    expect(alert).to_contain_text("quota is used up")
    expect(alert).to_contain_text("daily quota used")
    expect(page.locator("#start")).to_be_enabled()


def test_engine_pickers_come_from_the_status_endpoint(page: Page, server: Any) -> None:
    status = httpx.get(server.base_url + "/api/v1/audio/stream/status").json()
    open_page(page, server.base_url)
    rows = page.locator("#engines tr[data-model]")
    expect(rows).to_have_count(len(status["engines"]))
    for index, engine in enumerate(status["engines"]):
        row = rows.nth(index)
        expect(row).to_have_attribute("data-model", engine["model"])
        expect(row).to_have_attribute("data-variant", engine["variant"])
        if engine["available"]:
            expect(row).to_have_class(re.compile(r"\bavailable\b"))
        else:
            expect(row).to_have_class(re.compile(r"\bunavailable\b"))
            expect(row).to_contain_text(engine["reason"])
    parakeet = [e for e in status["engines"] if e["model"] == "parakeet"]
    assert parakeet and not any(e["available"] for e in parakeet)

    # Pickers: model names from the server, unavailable ones marked; variants follow the model.
    models = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert models == list(dict.fromkeys(e["model"] for e in status["engines"]))
    expect(page.locator("#model option[value=parakeet]")).to_contain_text("unavailable")
    page.select_option("#model", "parakeet")
    variants = page.eval_on_selector_all("#variant option", "options => options.map(o => o.value)")
    assert variants == [e["variant"] for e in parakeet]
    expect(page.locator("#engine-hint")).to_contain_text(parakeet[0]["reason"])
    expect(page.locator("#engine-hint")).to_contain_text("fall back")
    page.select_option("#model", "whisper")
    expect(page.locator("#engine-hint")).to_be_hidden()
    languages = page.eval_on_selector_all("#language option", "options => options.map(o => o.value)")
    assert languages[0] == "en"


def test_audio_file_streams_through_the_socket_with_the_fallback_warning(page: Page, server: Any) -> None:
    open_page(page, server.base_url, server.api_key)
    page.select_option("#model", "parakeet")
    page.select_option("#speed", "4")
    page.set_input_files("#file-input", str(DATA / "short.wav"))
    warning = page.locator(".notice.warning")
    expect(warning).to_contain_text("Fallback: whisper-tiny.en answers instead of parakeet-standard")
    expect(warning).to_contain_text("parakeet")
    expect(page.locator("#active-model")).to_have_text("whisper-tiny.en")
    expect(page.locator("#full-state")).to_have_text("complete")
    full = page.input_value("#full")
    assert set(SHORT_CLIP_WORDS) <= set(words(full)), full
    expect(page.locator("#connection")).to_have_attribute("data-state", "closed")
    # The file (3.05 s) went out as 100 ms frames at 16 kHz.
    expect(page.locator("#debug-audio")).to_have_text("31 frames, 3.0 s at 16 kHz")


def test_keyboard_alone_can_start_and_stop(page: Page, server: Any) -> None:
    open_page(page, server.base_url, server.api_key)
    page.locator("#api-key").focus()
    focused: list[str] = []
    for _ in range(12):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id"))
        if focused[-1] == "start":
            break
    assert focused[-1] == "start", focused
    page.keyboard.press("Enter")
    expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
    # Start moves focus to Stop, so the same key ends the session.
    assert page.evaluate("document.activeElement.id") == "stop"
    page.keyboard.press("Enter")
    expect(page.locator("#connection")).to_have_attribute("data-state", "closed")


def test_phone_layout_fits_the_screen(page: Page, server: Any, save_screenshot: Callable[..., Path]) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    open_page(page, server.base_url, server.api_key)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    for control in ("#start", "#stop", "#clear", "#api-key", "#model"):
        box = page.locator(control).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, control
    save_screenshot(page, "web-phone.png", full_page=True)


def test_unavailable_engines_cannot_be_chosen_when_the_server_does_not_fall_back(
    page: Page, make_server: Callable[..., Any]
) -> None:
    strict = make_server(allow_fallback=False)
    open_page(page, strict.base_url, strict.api_key)
    expect(page.locator("#model option[value=parakeet]")).to_be_disabled()
    expect(page.locator("#model option[value=canary]")).to_be_disabled()
    expect(page.locator("#model")).to_have_value("whisper")
    expect(page.locator("#start")).to_be_enabled()
    # A language the pickers do not list needs a code before Start can be used.
    page.select_option("#language", "other")
    expect(page.locator("#start")).to_be_disabled()
    expect(page.locator("#engine-hint")).to_contain_text("language code")
    page.fill("#language-other", "it")
    expect(page.locator("#start")).to_be_enabled()


def test_page_streams_with_the_key_in_the_first_message_not_the_url(
    page: Page, make_server: Callable[..., Any]
) -> None:
    """The key never goes in a URL a proxy would log, so the page works with ?token= turned off
    (issue 16, item 6); connect-src 'self' lets it reach its own server's socket (item 16)."""
    strict = make_server(access={"allow_query_token": False})
    sockets: list[str] = []
    page.on("websocket", lambda socket: sockets.append(socket.url))
    open_page(page, strict.base_url, strict.api_key)
    page.click("#start")
    expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
    expect(page.locator("#finals")).to_contain_text("friday", ignore_case=True)
    page.click("#stop")
    expect(page.locator("#full-state")).to_have_text("complete")
    assert sockets and all("token" not in url and strict.api_key not in url for url in sockets), sockets
    page.click("#debug summary")
    expect(page.locator("#debug-log li[data-direction=out][data-type=auth]")).to_have_count(1)
    assert strict.api_key not in page.inner_text("#debug")


class DroppingProxy:
    """A TCP proxy to a server, in a thread of its own: ``drop()`` cuts every connection through it without
    a close frame (as a phone changing networks sees it); new connections go through again."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        ready = threading.Event()
        self.port = 0

        async def serve() -> None:
            server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await server.serve_forever()

        threading.Thread(target=self._loop.run_until_complete, args=(serve(),), daemon=True).start()
        ready.wait(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._target)
        self._writers |= {writer, upstream_writer}

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.transport.abort()

        await asyncio.gather(copy(reader, upstream_writer), copy(upstream_reader, writer))

    def drop(self) -> None:
        def abort_all() -> None:
            for writer in self._writers:
                writer.transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(abort_all)


def test_a_dropped_connection_resumes_the_same_session_with_the_kept_audio(page: Page, server: Any) -> None:
    proxy = DroppingProxy(server.port)
    open_page(page, f"http://127.0.0.1:{proxy.port}", server.api_key)
    page.click("#start")
    expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
    expect(page.locator("#partial")).not_to_be_empty()  # mid-way through the sentence
    proxy.drop()
    expect(page.locator("#connection")).to_have_attribute("data-state", "ready")
    expect(page.locator("#finals")).to_contain_text("friday", ignore_case=True)
    page.click("#stop")
    expect(page.locator("#full-state")).to_have_text("complete")
    full = page.input_value("#full")
    assert set(SHORT_CLIP_WORDS) <= set(words(full)), full
    page.click("#debug summary")
    readies = page.eval_on_selector_all(
        "#debug-log li[data-direction=in][data-type=status]", "items => items.map(i => i.textContent)"
    )
    assert len([text for text in readies if '"ready"' in text]) == 2, "one session, resumed on a new socket"
    expect(page.locator("#debug-log li[data-direction=out][data-type=config]")).to_have_count(2)
