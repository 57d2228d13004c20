"""What happens to an upload to the file API (``POST /v1/audio/*``) before its route sees it.

``UploadGate`` answers what the headers alone decide, before a byte of the body is read: the server is
shutting down (503), the key is missing or wrong (401, or 403 for an address), the Content-Length is over
the limit (413). Then it counts the body as it arrives and answers 413 as soon as it passes the limit, so
the form parser never spools more than that to disk (a chunked body has no Content-Length to check). A
refused request's connection is closed after the answer: the rest of its body is never read. An upload
that gets through counts in the graceful shutdown until it is answered.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from streamscribe.protocol import ErrorType, StreamError
from streamscribe.server.openai_api import ApiError, file_too_large, openai_http_error, stream_error_response
from streamscribe.server.runtime import Runtime

UPLOAD_PATHS = "/v1/audio/"
FORM_FIELDS_BYTES = 64 * 1024  # room for the form's other fields and its part headers, beside the file


class UploadGate:
    """ASGI middleware in front of the file API's uploads (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(UPLOAD_PATHS):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        runtime: Runtime = request.app.state.runtime
        limit = runtime.settings.max_upload_bytes + FORM_FIELDS_BYTES
        refusal = await _refusal(request, runtime, limit)
        if refusal is not None:
            refusal.headers["Connection"] = "close"
            await refusal(scope, receive, send)
            return
        runtime.upload_started()
        try:
            await _BodyCount(self.app, limit, runtime.settings.max_upload_bytes)(scope, receive, send)
        finally:
            runtime.upload_finished()


async def _refusal(request: Request, runtime: Runtime, limit: int) -> Response | None:
    """The answer to an upload that its headers already refuse; None to let it in."""
    if runtime.draining.is_set():
        draining = StreamError(ErrorType.UNAVAILABLE, "the server is shutting down; try again shortly")
        return await stream_error_response(request, draining)
    try:
        await runtime.access.principal_for_request(request)
    except StreamError as error:
        return await stream_error_response(request, error)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return await openai_http_error(request, file_too_large(runtime.settings.max_upload_bytes))
    return None


class _BodyCount:
    """One request: its body counted as the app reads it; past ``limit`` the read fails with a 413
    (answered by the app's handler, or here when it escapes) and the answer closes the connection.

    Once the whole body is in, a task of its own waits for the client to leave, and the app's receive
    reports it: ``Request.is_disconnected`` cannot see it through Starlette's BaseHTTPMiddleware (the
    request log), whose receive it polls with a cancelled scope.
    """

    def __init__(self, app: ASGIApp, limit: int, max_upload_bytes: int) -> None:
        self._app = app
        self._limit = limit
        self._max_upload_bytes = max_upload_bytes
        self._received = 0
        self._over = False
        self._started = False
        self._gone = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted_receive() -> Message:
            if self._watcher is not None:
                await self._gone.wait()  # returns at once when set, so a poll sees it
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                self._received += len(message.get("body", b""))
                if self._received > self._limit:
                    self._over = True
                    raise file_too_large(self._max_upload_bytes)
                if not message.get("more_body", False):
                    self._watcher = asyncio.create_task(self._watch(receive))
            elif message["type"] == "http.disconnect":
                self._gone.set()
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._started = True
                if self._over:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self._app(scope, counted_receive, closing_send)
        except ApiError as error:
            if not self._over or self._started:
                raise
            response = await openai_http_error(Request(scope), error)
            await response(scope, receive, closing_send)
        finally:
            if self._watcher is not None:
                self._watcher.cancel()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._gone.set()
