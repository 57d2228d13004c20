"""The browser page: ``/`` serves index.html, ``/web/...`` its scripts and styles, from the package."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

# Everything the page loads comes from this server; the socket may be ws: or wss: behind a proxy.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data: blob:; "
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


def add_web_page(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/web`` (a sub-path, so no API route is shadowed)."""

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(
            WEB_DIR / "index.html",
            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
        )

    app.mount("/web", RevalidatedStaticFiles(directory=WEB_DIR), name="web")
