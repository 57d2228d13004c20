"""The browser page: ``/`` serves index.html, ``/web/...`` its scripts and styles, from the package."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# Everything the page loads or connects to is this server: 'self' covers its own ws: and wss: (CSP 3),
# so page scripts cannot open sockets to other hosts.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


class RevalidatedStaticFiles(StaticFiles):
    """Files the browser revalidates on every load (cheap, by ETag), so that after an upgrade a page
    never runs new modules beside cached old ones."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        return response


class NoSniff:
    """Sends ``X-Content-Type-Options: nosniff`` with every HTTP response: browsers then take each file
    as the type the server names (a JSON answer or an upload's echo never runs as a script)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        await self.app(scope, receive, send_with_header)


def add_web_page(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/web`` (a sub-path, so no API route is shadowed)."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(
            WEB_DIR / "index.html",
            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
        )

    app.mount("/web", RevalidatedStaticFiles(directory=WEB_DIR), name="web")
    app.add_middleware(NoSniff)
