"""What every connection shares: settings, access control (keys, quotas), loaded engines, their schedulers,
the VAD model, metrics, and the shutdown state."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from streamscribe.config import Settings
from streamscribe.engines.base import (
    AudioWindow,
    Engine,
    EngineUnavailable,
    StreamingEngine,
    StreamUpdate,
    Transcript,
)
from streamscribe.engines.registry import EngineChoice, EngineRegistry, resolve_model
from streamscribe.protocol import ErrorType, StreamError
from streamscribe.server.auth import AccessControl
from streamscribe.server.memory import MemoryTrimmer
from streamscribe.server.metrics import ServerMetrics
from streamscribe.server.resume import Resumes
from streamscribe.streaming.diarization import DiarizationUnavailable, Diarizer, load_speaker_model
from streamscribe.streaming.native import native_session
from streamscribe.streaming.scheduler import Scheduler, StreamPiece, stream_scheduler, window_scheduler
from streamscribe.streaming.session import LiveSession, SessionEvent, SessionOptions
from streamscribe.streaming.vad import SileroVad
from streamscribe.streaming.windows import window_session

log = logging.getLogger(__name__)
T = TypeVar("T")


class Runtime:
    """Process-wide state of a running server; created once by the app's lifespan."""

    def __init__(self, settings: Settings, api_key: str) -> None:
        self.settings = settings
        self.access = AccessControl(settings, api_key)
        self.registry = EngineRegistry(settings)
        self.vad = SileroVad()
        self.metrics = ServerMetrics()
        shared = settings.shared_store
        self.resumes = Resumes.for_settings(shared.redis_url, shared.timeout_seconds, settings.resume_seconds)
        self.draining = asyncio.Event()
        self.models_ready = not settings.preload
        self.memory = MemoryTrimmer()
        self._schedulers: dict[str, Scheduler[AudioWindow, Transcript]] = {}
        self._steppers: dict[str, Scheduler[StreamPiece, StreamUpdate]] = {}
        self.active_streams = 0  # admitted streams (admission control)
        self._open_streams = 0  # open sockets (graceful shutdown waits for them)
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        self._open_uploads = 0  # file API requests in flight (graceful shutdown waits for them too)
        self._no_uploads = asyncio.Event()
        self._no_uploads.set()
        # Decoding and cutting uploaded files: threads of their own, so a burst of uploads takes turns
        # there instead of starving key lookups and live streams on the default executor.
        # Threads that load engines, or wait on a load under way (see ``_load``); waiting costs a thread.
        self._engine_loads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="engine-load")
        self._file_work = ThreadPoolExecutor(
            max_workers=max(1, (os.cpu_count() or 1) // 2), thread_name_prefix="file-decode"
        )

    async def choose_engine(
        self, model: str, variant: str, language: str, task: str = "transcribe"
    ) -> EngineChoice:
        """``EngineRegistry.choose_engine``; loading (seconds) runs on threads of its own (``_load``)."""
        choose = functools.partial(self.registry.choose_engine, model, variant, language, task)
        return await self._load(choose)

    def scheduler(self, engine: Engine) -> Scheduler[AudioWindow, Transcript]:
        """The queue of ``engine``'s whole-window decodes (live windows and files)."""
        if engine.name not in self._schedulers:
            self._schedulers[engine.name] = window_scheduler(
                engine,
                workers=self.settings.decode_worker_count,
                max_batch=self.settings.decode_batch,
                overload_seconds=self.settings.streaming.overload_seconds,
                observer=self.metrics,
            )
        return self._schedulers[engine.name]

    def admit(self, engine: Engine) -> None:
        """Take a stream slot, or refuse: better a clear "try later" than a stream that cannot keep up."""
        limit = self.settings.max_streams
        if limit and self.active_streams >= limit:
            raise StreamError(ErrorType.SERVER_BUSY, f"server is at its limit of {limit} streams")
        live = self.stepper(engine) if isinstance(engine, StreamingEngine) else self.scheduler(engine)
        if live.overloaded:
            raise StreamError(
                ErrorType.SERVER_BUSY,
                f"{engine.name} is behind on the streams it has; try again shortly",
            )
        self.active_streams += 1

    def release(self) -> None:
        self.active_streams -= 1

    def stepper(self, engine: StreamingEngine) -> Scheduler[StreamPiece, StreamUpdate]:
        """The queue of a streaming engine's steps (live streams only)."""
        if engine.name not in self._steppers:
            self._steppers[engine.name] = stream_scheduler(
                engine, self.settings.streaming.overload_seconds, self.metrics
            )
        return self._steppers[engine.name]

    def session_options(self, language: str, **choices: Any) -> SessionOptions:
        """A stream's options, any protocol: the client's ``choices`` over this server's streaming and VAD
        settings."""
        streaming = self.settings.streaming
        server: dict[str, Any] = {
            "max_segment_seconds": streaming.max_segment_seconds,
            "max_backlog_seconds": streaming.max_backlog_seconds,
            "prompt_chars": streaming.prompt_chars,
            "vad": self.settings.vad,
        }
        return SessionOptions(language=language, **(server | choices))

    def new_session(
        self, engine: Engine, options: SessionOptions, emit: Callable[[SessionEvent], Awaitable[None]]
    ) -> LiveSession:
        """A live session for ``engine``: its own streaming when it has one, else re-decoded windows."""
        if isinstance(engine, StreamingEngine):
            return native_session(engine, self.stepper(engine), self.vad, options, emit)
        return window_session(self.scheduler(engine), self.vad, options, emit, engine.sample_rate)

    async def diarizer(self) -> Diarizer:
        """A new stream's (or file's) speakers; the model loads on first use, off the event loop. Without
        the diarization extra: model_unavailable, naming the extra."""
        try:
            return Diarizer(await asyncio.to_thread(load_speaker_model))
        except DiarizationUnavailable as exc:
            raise StreamError(ErrorType.MODEL_UNAVAILABLE, str(exc)) from None

    async def preload(self) -> None:
        """Load the default (fallback) English engine before the first client needs it."""
        engine = (await self.choose_engine("whisper", "standard", "en")).engine
        log.info("model %s ready", engine.name, extra={"event": "model_ready", "engine": engine.name})

    async def preload_configured(self) -> None:
        """Load every other engine this server is configured for (NeMo weights set and their packages
        installed; Moonshine when it is the default model), one after another, then mark the models ready:
        a NeMo load takes 10-25 s, which no first stream should wait for. Meanwhile ``/readyz`` says 503; a
        stream for an engine still loading waits for its load, one for another engine does not. A load
        that fails is logged, and its streams get the reason."""
        default_model, _ = resolve_model(self.settings.default_model)
        for status in self.registry.status():
            if status.model == "whisper" or not status.available:
                continue
            if status.model == "moonshine" and default_model != "moonshine":
                continue  # installed, not configured: its first stream loads it
            try:
                load = functools.partial(self.registry.get, status.model, status.variant, "en")
                engine = await self._load(load)
            except EngineUnavailable as exc:
                log.error("preloading %s (%s) failed: %s", status.model, status.variant, exc)
                continue
            log.info("model %s ready", engine.name, extra={"event": "model_ready", "engine": engine.name})
        self.models_ready = True

    async def _load(self, load: Callable[[], T]) -> T:
        """``load()`` on the loading threads: a stream waiting there for an engine that is still loading
        holds none of the default threads, which decode every other stream's audio."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._engine_loads, load)

    @property
    def ready(self) -> bool:
        """Models loaded and not shutting down: a load balancer may send new clients here."""
        return self.models_ready and not self.draining.is_set()

    def stream_opened(self) -> None:
        self._open_streams += 1
        self._no_streams.clear()
        self.metrics.active_streams.inc()

    def stream_closed(self) -> None:
        self._open_streams -= 1
        self.metrics.active_streams.dec()
        self.memory.trim_soon()
        if self._open_streams == 0:
            self._no_streams.set()

    def upload_started(self) -> None:
        self._open_uploads += 1
        self._no_uploads.clear()

    def upload_finished(self) -> None:
        self._open_uploads -= 1
        self.memory.trim_soon()
        if self._open_uploads == 0:
            self._no_uploads.set()

    async def run_file_work(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the file-decoding threads (one piece of a file at a time)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._file_work, functools.partial(function, *args))

    async def _idle(self) -> None:
        await self._no_streams.wait()
        await self._no_uploads.wait()

    async def drain(self) -> bool:
        """Tell every stream to finish (see StreamConnection) and wait up to the grace time for them; True
        when every stream and upload finished in time."""
        grace = self.settings.shutdown_grace_seconds
        self.draining.set()
        log.info(
            "draining %d stream(s) and %d upload(s) within %g s",
            self._open_streams,
            self._open_uploads,
            grace,
            extra={"event": "drain", "streams": self._open_streams, "uploads": self._open_uploads},
        )
        try:
            await asyncio.wait_for(self._idle(), grace)
        except TimeoutError:
            log.warning(
                "%d stream(s) and %d upload(s) still open after the grace time",
                self._open_streams,
                self._open_uploads,
            )
            return False
        return True

    async def close(self) -> None:
        self.memory.close()
        await self.access.close()
        await self.resumes.close()
        schedulers: list[Scheduler[Any, Any]] = [*self._schedulers.values(), *self._steppers.values()]
        for scheduler in schedulers:
            await scheduler.close()
        self._file_work.shutdown(wait=False, cancel_futures=True)
        self._engine_loads.shutdown(wait=False, cancel_futures=True)
