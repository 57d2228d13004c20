"""Which server names requests may address (the Host header), against DNS rebinding.

A page on an attacker's name that resolves to this server's address is same-origin with itself, so the
Origin check (``origins.py``) lets its WebSocket through; only the Host header tells that the browser
thinks it is talking to another site. Starlette's TrustedHostMiddleware refuses such requests with 400,
WebSocket upgrades included.
"""

from __future__ import annotations

from collections.abc import Collection

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from streamscribe.config import Settings

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def allowed_host_names(settings: Settings) -> list[str]:
    """``settings.allowed_hosts``, or by default the loopback names and the listening address (every name
    when listening on all interfaces, where the names people use are not known)."""
    if settings.allowed_hosts is not None:
        return settings.allowed_hosts
    if settings.host in WILDCARD_ADDRESSES:
        return ["*"]
    listening = f"[{settings.host}]" if ":" in settings.host else settings.host
    return list(dict.fromkeys([*LOOPBACK_NAMES, listening.lower()]))


# Probes and scrapers address a replica by its own IP (Kubernetes httpGet, Prometheus): these answer
# nothing a rebinding page could use that it cannot already read from a server it reaches.
UNCHECKED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class HostCheck:
    """Starlette's TrustedHostMiddleware, except for ``unchecked_paths``."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], unchecked_paths: Collection[str]) -> None:
        self.app = app
        self.checked = TrustedHostMiddleware(app, allowed_hosts=allowed_hosts, www_redirect=False)
        self.unchecked_paths = unchecked_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.unchecked_paths:
            await self.app(scope, receive, send)
        else:
            await self.checked(scope, receive, send)


def add_host_check(app: FastAPI, settings: Settings) -> None:
    """Refuse requests and upgrades whose Host is not an allowed name (400), probes excepted."""
    app.add_middleware(HostCheck, allowed_hosts=allowed_host_names(settings), unchecked_paths=UNCHECKED_PATHS)
