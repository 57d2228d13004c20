"""Small helpers shared by the multi-user tests: keys in a server's database, the limits endpoint, and
WebSocket connections that are held open or refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, Protocol

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streamscribe.config import Settings
from streamscribe.server.auth import KeyHasher, create_key, load_pepper
from streamscribe.server.store import open_store


class AnyServer(Protocol):
    """An in-process test server or a server process: its settings and base URL."""

    @property
    def settings(self) -> Settings: ...

    @property
    def base_url(self) -> str: ...


def new_key(server: AnyServer, user: str, **kwargs: Any) -> str:
    """A fresh key in the server's own database, made the way ``streamscribe keys create`` makes one."""
    store = open_store(server.settings)
    try:
        return create_key(store, KeyHasher(load_pepper(server.settings)), user, **kwargs).key
    finally:
        store.close()


def limits(server: AnyServer, key: str) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/api/v1/audio/stream/limits", headers={"X-API-KEY": key})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def open_stream(url: str, headers: dict[str, str] | None = None) -> ClientConnection:
    """A stream that has been configured (its ``configured`` status read), held open: the caller closes it."""
    ws = await connect(url, additional_headers=headers)
    await ws.send(json.dumps({"type": "config"}))
    frame = json.loads(await ws.recv())
    assert frame.get("state") == "configured", frame
    return ws


async def refused(
    url: str, first: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int | None, dict[str, Any] | None]:
    """Connect, send ``first`` (default: a config) and return (close code, error frame)."""
    error = None
    async with connect(url, additional_headers=headers) as ws:
        # The server may refuse before it reads anything: the send can meet a closed socket.
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(first or {"type": "config"}))
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                frame = json.loads(raw)
                if frame["type"] == "error":
                    error = frame
    return ws.close_code, error


async def worst_pong(ws: ClientConnection, seconds: float, frame: str | None = None) -> tuple[float, int]:
    """Ping about every 0.1 s for ``seconds``, each ping after ``frame`` when given: (the longest wait for a
    pong, pings sent)."""
    worst, pings = 0.0, 0
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if frame is not None:
            await ws.send(frame)
        pinged = time.monotonic()
        await ws.send(json.dumps({"type": "ping"}))
        pings += 1
        while json.loads(await ws.recv())["type"] != "pong":
            pass
        worst = max(worst, time.monotonic() - pinged)
        await asyncio.sleep(0.1)
    return worst, pings
