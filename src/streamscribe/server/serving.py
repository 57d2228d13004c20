"""Running the app: uvicorn options (TLS, WebSocket pings) and a graceful shutdown on SIGTERM."""

from __future__ import annotations

import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from streamscribe.config import Settings


def uvicorn_config(settings: Settings, app: FastAPI, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration for ``settings`` (used by ``serve`` and the test servers alike)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": None,  # logging is configured by streamscribe.server.logs
        "access_log": False,  # the app logs each request itself, without its query string (tokens)
        "lifespan": "on",
        "ws_max_size": 4 * settings.streaming.max_frame_bytes,
        # Off unless configured: inflating happens before the app can pace a stream (see server/pacing.py).
        "ws_per_message_deflate": settings.streaming.permessage_deflate,
        "ws_ping_interval": settings.ws_ping_interval_seconds,
        "ws_ping_timeout": settings.ws_ping_timeout_seconds,
        # The app drains streams itself (GracefulServer); this bounds what is left after that.
        "timeout_graceful_shutdown": 5,
    }
    if settings.ssl_certfile:
        options["ssl_certfile"] = str(settings.ssl_certfile)
        options["ssl_keyfile"] = str(settings.ssl_keyfile) if settings.ssl_keyfile else None
    options.update(overrides)
    return uvicorn.Config(app, **options)


class GracefulServer(uvicorn.Server):
    """uvicorn, but on SIGTERM streams are drained before uvicorn closes what is left.

    uvicorn's own shutdown closes every WebSocket at once with 1012. Here the listening sockets close
    first (no new connections), then every stream finishes its current utterance, receives its finals
    and ``full_transcript`` and is closed with 1001, within ``shutdown_grace_seconds``.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        runtime = getattr(self._app.state, "runtime", None)
        if runtime is not None and not self.force_exit:
            await runtime.drain()
        await super().shutdown(sockets=sockets)
