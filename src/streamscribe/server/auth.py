"""API keys: how a client presents one, and the constant-time check. Keys are never logged or stored."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets

from starlette.requests import HTTPConnection


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
