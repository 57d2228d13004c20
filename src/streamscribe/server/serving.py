"""Running the app: uvicorn options (TLS, WebSocket pings, proxies, connection limits), a deadline for
request headers, and a graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from streamscribe.config import Settings

# Request line and headers larger than this are refused (431), whichever HTTP parser uvicorn uses.
MAX_REQUEST_HEAD_BYTES = 64 * 1024

if TYPE_CHECKING:
    _ProtocolBase = asyncio.Protocol
else:
    _ProtocolBase = object


class RequestHeadDeadline(_ProtocolBase):
    """Mixed into uvicorn's HTTP protocol: a connection must send a whole request head (request line and
    headers) within ``head_timeout_seconds`` of opening, or of its first byte after a keep-alive response,
    and no more than ``MAX_REQUEST_HEAD_BYTES`` of it; otherwise it is closed.

    uvicorn arms no timer until a first response is sent, and none while a request head is incomplete, so
    without this a client trickling header bytes (slowloris) holds a descriptor for ever.
    """

    head_timeout_seconds: float = 10.0
    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._awaiting_head = True
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            if self._head_timer is None:
                self._arm_head_timer()
            self._head_bytes += len(data)
        cycle_before = self.cycle
        super().data_received(data)
        if not self._awaiting_head:
            return
        if self.cycle is not cycle_before or self.transport.get_protocol() is not self:
            # A new request cycle, or a WebSocket upgrade (the transport has a new protocol): head complete.
            self._awaiting_head = False
            self._cancel_head_timer()
        elif self._head_bytes > MAX_REQUEST_HEAD_BYTES and not self.transport.is_closing():
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-length: 0\r\nconnection: close\r\n\r\n"
            )
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if self.cycle is None or self.cycle.response_complete:
            # Waiting for the next request: uvicorn's keep-alive timer covers the idle time, and the
            # deadline starts again with its first byte.
            self._awaiting_head = True
            self._head_bytes = 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self.head_timeout_seconds, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._awaiting_head and not self.transport.is_closing():
            self.transport.close()


def http_protocol(head_timeout_seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with a deadline for request heads."""
    return type(
        "DeadlineHTTPProtocol",
        (RequestHeadDeadline, AutoHTTPProtocol),
        {"head_timeout_seconds": head_timeout_seconds},
    )


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
        "ws_ping_timeout": settings.ws_ping_timeout_seconds or None,
        # The app drains streams itself (GracefulServer); this bounds what is left after that.
        "timeout_graceful_shutdown": 5,
        "http": http_protocol(settings.header_timeout_seconds),
        "h11_max_incomplete_event_size": MAX_REQUEST_HEAD_BYTES,
        "limit_concurrency": settings.limit_concurrency or None,
        # X-Forwarded-For and -Proto are read only from the listed proxies; by default from nobody
        # (uvicorn's own default trusts loopback, which lets any local process pick its address).
        "proxy_headers": bool(settings.trusted_proxies),
        "forwarded_allow_ips": settings.trusted_proxies or [],
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
    and ``full_transcript`` and is closed with 1001, within ``shutdown_grace_seconds``; when they all did,
    the process exits 0.
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
        if runtime is not None and not self.force_exit and await runtime.drain():
            # uvicorn re-raises a captured SIGTERM once it is done, so the process would exit 143 (killed)
            # after a clean drain; a drain that finished is a clean exit (0). One that ran past the grace
            # time keeps the signal's exit status.
            self._captured_signals = [sig for sig in self._captured_signals if sig != signal.SIGTERM]
        await super().shutdown(sockets=sockets)
