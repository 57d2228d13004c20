"""The FastAPI application: routes, and the lifespan that loads models once per process."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from streamscribe import __version__
from streamscribe.config import Settings
from streamscribe.protocol import StreamError, StreamLimitsReport
from streamscribe.server import metrics
from streamscribe.server.hosts import add_host_check
from streamscribe.server.logs import install_log_redaction, new_request_id
from streamscribe.server.openai_api import (
    openai_http_error,
    openai_validation_error,
    stream_error_response,
)
from streamscribe.server.openai_api import router as openai_router
from streamscribe.server.realtime import REALTIME_PATH, RealtimeConnection
from streamscribe.server.runtime import Runtime
from streamscribe.server.stream import StreamConnection
from streamscribe.server.uploads import UploadGate
from streamscribe.server.web import add_web_page
from streamscribe.server.wyoming import WyomingServer

STREAM_PATH = "/api/v1/audio/stream/transcribe"
LIMITS_PATH = "/api/v1/audio/stream/limits"
log = logging.getLogger("streamscribe.http")
_PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def create_app(settings: Settings, api_key: str) -> FastAPI:
    """A server for ``settings`` that accepts ``api_key``."""
    install_log_redaction()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, api_key)
        app.state.runtime = runtime
        preloads: asyncio.Task[None] | None = None
        if settings.preload:
            await runtime.preload()  # the bundled Whisper: about a second, before the port opens
            preloads = asyncio.create_task(runtime.preload_configured())  # NeMo: /readyz is 503 meanwhile
        wyoming = WyomingServer(runtime) if settings.wyoming_port else None
        if wyoming is not None:
            await wyoming.start()
        yield
        if wyoming is not None:
            await wyoming.close()
        if preloads is not None:
            preloads.cancel()
            await asyncio.gather(preloads, return_exceptions=True)
        await runtime.close()

    app = FastAPI(title="streamscribe", version=__version__, lifespan=lifespan)
    # Innermost of the middleware: CORS headers and the request log cover what it refuses.
    app.add_middleware(UploadGate)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-KEY", "Content-Type"],
        )

    @app.middleware("http")
    async def log_request(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """One log line per request, with an id (also sent back as X-Request-ID) and no query string."""
        request_id = new_request_id("http")
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-ID"] = request_id
        route = request.scope.get("route")
        route_path = getattr(route, "path", "unmatched")
        runtime: Runtime | None = getattr(request.app.state, "runtime", None)
        if runtime is not None:
            runtime.metrics.http_requests.labels(route_path, str(response.status_code)).inc()
        # Probes and scrapes every few seconds would drown the log: they are debug lines.
        level = logging.DEBUG if request.url.path in _PROBE_PATHS else logging.INFO
        log.log(
            level,
            "%s %s %d",
            request.method,
            request.url.path,
            response.status_code,
            extra={
                "event": "http_request",
                "method": request.method,
                "path": request.url.path,
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )
        return response

    @app.websocket(STREAM_PATH)
    async def transcribe_stream(websocket: WebSocket) -> None:
        await StreamConnection(websocket, websocket.app.state.runtime).run()

    @app.websocket(REALTIME_PATH)
    async def realtime_transcription(websocket: WebSocket) -> None:
        """OpenAI's Realtime API, transcription sessions (``?intent=transcription``)."""
        await RealtimeConnection(websocket, websocket.app.state.runtime).run()

    @app.get("/api/v1/audio/stream/status")
    async def stream_status() -> dict[str, Any]:
        """Every engine, variant and language, with availability and the reason when unavailable."""
        runtime: Runtime = app.state.runtime
        return {
            "default_model": settings.default_model,
            "fallback": settings.allow_fallback,
            "loaded": [engine.name for engine in runtime.registry.loaded()],
            "engines": [asdict(status) for status in runtime.registry.status()],
            "access": {
                "auth_mode": settings.auth_mode,
                "shared_store": runtime.access.quotas.shared,
                "shared_store_healthy": runtime.access.quotas.shared_store_healthy,
                "shared_store_failures": runtime.access.quotas.shared_store_failures,
            },
        }

    @app.get(LIMITS_PATH, response_model=StreamLimitsReport)
    async def stream_limits(request: Request) -> StreamLimitsReport:
        """The calling key's limits and today's usage (key as a header or ?token=)."""
        access = app.state.runtime.access
        who = await access.principal_for_request(request)
        return await access.quotas.limits_report(who.user_id, who.tier, who.limits, who.may_stream)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up and serving requests."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready for new clients: models loaded, the shared store answering (when new streams depend on it),
        and not shutting down; else 503."""
        runtime: Runtime = app.state.runtime
        quotas = runtime.access.quotas
        store_ok = quotas.shared_store_healthy or settings.shared_store.on_failure == "fail_open"
        ready = runtime.ready and store_ok
        body = {
            "status": "ready" if ready else "not_ready",
            "models_loaded": runtime.models_ready,
            "loaded": [engine.name for engine in runtime.registry.loaded()],
            "store_reachable": quotas.shared_store_healthy if quotas.shared else None,
            "draining": runtime.draining.is_set(),
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus text format; without a key unless ``metrics_require_key`` (then keep it internal)."""
        runtime: Runtime = app.state.runtime
        if settings.metrics_require_key:
            await runtime.access.principal_for_request(request)
        return Response(runtime.metrics.render(), media_type=metrics.CONTENT_TYPE)

    app.include_router(openai_router)
    app.add_exception_handler(StarletteHTTPException, openai_http_error)
    app.add_exception_handler(StreamError, stream_error_response)
    app.add_exception_handler(RequestValidationError, openai_validation_error)
    add_web_page(app)
    add_host_check(app, settings)  # outermost: a request for another name gets no further
    return app
