"""Which web pages may use this server from a browser: the allowed-Origin policy for WebSocket upgrades.

Browsers send ``Origin`` with every WebSocket upgrade and do not apply CORS to WebSockets, so without
this check any site a user visits could open a stream with a key the browser holds. Clients that are not
browsers send no ``Origin`` and are not affected.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import HTTPConnection


def origin_allowed(connection: HTTPConnection, allowed_origins: list[str]) -> bool:
    """True for no Origin (not a browser), a same-origin page, a listed origin, or when "*" is listed."""
    origin = connection.headers.get("origin")
    if origin is None or "*" in allowed_origins:
        return True
    if origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in allowed_origins}:
        return True
    host = connection.headers.get("host", "").lower()
    return bool(host) and urlsplit(origin).netloc.lower() == host
