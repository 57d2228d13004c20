"""The FastAPI application: routes, and the lifespan that loads models once per process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse

from streamscribe import __version__
from streamscribe.config import Settings
from streamscribe.protocol import CloseCode, StreamError, StreamLimitsReport
from streamscribe.server.auth import install_log_redaction
from streamscribe.server.runtime import Runtime
from streamscribe.server.stream import StreamConnection
from streamscribe.server.web import add_web_page

STREAM_PATH = "/api/v1/audio/stream/transcribe"
LIMITS_PATH = "/api/v1/audio/stream/limits"


def create_app(settings: Settings, api_key: str) -> FastAPI:
    """A server for ``settings`` that accepts ``api_key``."""
    install_log_redaction()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, api_key)
        if settings.preload:
            await runtime.preload()
        app.state.runtime = runtime
        yield
        await runtime.close()

    app = FastAPI(title="streamscribe", version=__version__, lifespan=lifespan)

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
            "access": {
                "auth_mode": settings.auth_mode,
                "shared_store": runtime.access.quotas.shared,
                "shared_store_healthy": runtime.access.quotas.shared_store_healthy,
                "shared_store_failures": runtime.access.quotas.shared_store_failures,
            },
        }

    @app.get(LIMITS_PATH, response_model=StreamLimitsReport)
    async def stream_limits(request: Request) -> StreamLimitsReport | JSONResponse:
        """The calling key's limits and today's usage (key as a header or ?token=)."""
        access = app.state.runtime.access
        try:
            return await access.limits_report(await access.principal_for_request(request))
        except StreamError as error:
            status = 403 if error.close_code == CloseCode.POLICY_VIOLATION else 401
            body = error.to_frame().model_dump(mode="json", exclude_none=True)
            return JSONResponse(body, status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    add_web_page(app)
    return app
