"""API keys: how a client presents one, and the constant-time check. Keys are never logged or stored."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets

from fastapi import HTTPException
from starlette.requests import HTTPConnection, Request


def generate_api_key() -> str:
    """A random 32-byte key, URL-safe."""
    return secrets.token_urlsafe(32)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class SingleUserAuth:
    """One key for the whole server; only its SHA-256 is kept in memory."""

    def __init__(self, api_key: str) -> None:
        self._digest = _digest(api_key)

    def is_valid(self, presented: str | None) -> bool:
        # Comparing digests keeps the comparison constant-time whatever the presented length.
        return presented is not None and hmac.compare_digest(_digest(presented), self._digest)


def presented_key(connection: HTTPConnection) -> str | None:
    """The key from ``?token=``, ``X-API-KEY`` or ``Authorization: Bearer``, if any."""
    header = connection.headers.get("x-api-key")
    if header:
        return header.strip()
    authorization = connection.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return connection.query_params.get("token") or None


_SECRET_IN_TEXT = re.compile(r"((?:token|api_key|key)=)[^&\s\"']+", re.IGNORECASE)


class RedactSecrets(logging.Filter):
    """Removes ``token=...`` from log lines (uvicorn logs request paths with their query strings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _SECRET_IN_TEXT.sub(r"\1[redacted]", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        if isinstance(record.msg, str):
            record.msg = _SECRET_IN_TEXT.sub(r"\1[redacted]", record.msg)
        return True


def install_log_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn", "websockets.server", "streamscribe"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


def authenticate(connection: HTTPConnection) -> str | None:
    """The presented key when it is valid, else None: the one check behind every HTTP route and stream.

    A multi-user key store replaces this function (and ``charge_audio``) and nothing else.
    """
    key = presented_key(connection)
    return key if connection.app.state.runtime.auth.is_valid(key) else None


def require_key(request: Request) -> str:
    """FastAPI dependency for authenticated HTTP routes: the valid key, or 401."""
    key = authenticate(request)
    if key is None:
        raise HTTPException(
            status_code=401,
            detail="missing or invalid API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key


def charge_audio(connection: HTTPConnection, key: str, seconds: float) -> None:
    """Account ``seconds`` of transcribed audio (a file, or a stream when it ends) to ``key``.

    Single-user servers have no quota, so this is a no-op hook for the multi-user quota store.
    """
