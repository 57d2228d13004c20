"""The FastAPI application: routes, and the lifespan that loads models once per process."""

from __future__ import annotations

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
from streamscribe.server import metrics
from streamscribe.server.auth import install_log_redaction
from streamscribe.server.logs import new_request_id
from streamscribe.server.openai_api import error_body, openai_http_error, openai_validation_error
from streamscribe.server.openai_api import router as openai_router
from streamscribe.server.runtime import Runtime
from streamscribe.server.stream import StreamConnection

STREAM_PATH = "/api/v1/audio/stream/transcribe"
log = logging.getLogger("streamscribe.http")
_PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def create_app(settings: Settings, api_key: str) -> FastAPI:
    """A server for ``settings`` that accepts ``api_key``."""
    install_log_redaction()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, api_key)
        app.state.runtime = runtime
        if settings.preload:
            await runtime.preload()
        yield
        await runtime.close()

    app = FastAPI(title="streamscribe", version=__version__, lifespan=lifespan)
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
        length = request.headers.get("content-length", "")
        limit = settings.max_upload_bytes + 64 * 1024  # the file plus the form's other fields
        if request.url.path.startswith("/v1/audio/") and length.isdigit() and int(length) > limit:
            # Refused before the body is read (the form parser would spool it all to disk first).
            message = f"the file is larger than the limit of {settings.max_upload_bytes} bytes"
            return JSONResponse(
                error_body(message, "file_too_large", "file"),
                status_code=413,
                headers={"X-Request-ID": request_id},
            )
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

    @app.get("/api/v1/audio/stream/status")
    async def stream_status() -> dict[str, Any]:
        """Every engine, variant and language, with availability and the reason when unavailable."""
        runtime: Runtime = app.state.runtime
        return {
            "default_model": settings.default_model,
            "fallback": settings.allow_fallback,
            "loaded": [engine.name for engine in runtime.registry.loaded()],
            "engines": [asdict(status) for status in runtime.registry.status()],
        }

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up and serving requests."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready for new clients: models loaded and not shutting down (else 503)."""
        runtime: Runtime = app.state.runtime
        body = {
            "status": "ready" if runtime.ready else "not_ready",
            "models_loaded": runtime.models_ready,
            "loaded": [engine.name for engine in runtime.registry.loaded()],
            "draining": runtime.draining.is_set(),
        }
        return JSONResponse(body, status_code=200 if runtime.ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus text format; unauthenticated, like /healthz: expose it on an internal network."""
        runtime: Runtime = app.state.runtime
        return Response(runtime.metrics.render(), media_type=metrics.CONTENT_TYPE)

    app.include_router(openai_router)
    app.add_exception_handler(StarletteHTTPException, openai_http_error)
    app.add_exception_handler(RequestValidationError, openai_validation_error)
    return app
