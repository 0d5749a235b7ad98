"""Structured logs: one JSON object per line on stderr, with ids, and keys redacted.

Every record passes through `redact` in the formatter, so a key that slipped into a message or
an exception text still never reaches the output.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from .handshake import redact


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": self.role,
            "event": record.getMessage(),
        }
        for name in ("session_id", "request_id", "account_id", "pid"):
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


def configure(role: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs "connection open" at INFO for every handshake it checks (the front door)
    # or completes (a worker's upstream): a line per session set-up that says less than ours
    for noisy in ("uvicorn.access", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class SessionLog(logging.LoggerAdapter):
    """A logger carrying a session's ids on every line; `fields=` adds structured data."""

    def process(self, msg, kwargs):
        extra = dict(self.extra)
        if "fields" in kwargs:
            extra["fields"] = kwargs.pop("fields")
        kwargs["extra"] = extra
        return msg, kwargs


def session_log(name: str, session_id: str, request_id: str) -> SessionLog:
    return SessionLog(logging.getLogger(name), {"session_id": session_id, "request_id": request_id})


def one_line(exc: BaseException) -> str:
    """An exception as one log field: a database error's first line (SQLAlchemy's carry the SQL
    and a help link on more), at most 300 characters."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
