"""Structured logs: one JSON object per line and event, tagged with the request or connection id.

Never log an API key or audio: keys are redacted from messages (RedactSecrets) and request paths
are logged without their query string.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from contextvars import ContextVar
from typing import Any

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is part of the event.
# uvicorn adds "color_message" (the message with terminal colour codes) to its records: noise in JSON.
_STANDARD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",
}


def new_request_id(prefix: str) -> str:
    """A short random id ("http-3f9a1c2b"), set for the current task so every log line carries it."""
    value = f"{prefix}-{secrets.token_hex(4)}"
    request_id.set(value)
    return value


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
    """Put RedactSecrets on every logger that may print a URL with a key in it."""
    # A logger's filters see only records logged on that very logger, so each one that prints URLs is named:
    # websockets' client logs its request line (with ?token=) at debug level.
    names = ("uvicorn.access", "uvicorn.error", "uvicorn", "websockets.client", "websockets.server")
    for name in (*names, "streamscribe"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id", ...extra}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current:
            event["request_id"] = current
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                event[key] = value
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """Route every logger (uvicorn's included) to one standard-error handler in the chosen format."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
