"""Log setup for ``keel serve``: readable text, or JSON with one object per line.

JSON records carry ``ts``, ``level``, ``logger``, ``msg``, ``request_id`` when
logged while serving a request, and ``exc`` with the traceback when there is
one. The request id lives in a :class:`contextvars.ContextVar` set by
:class:`keel.api.middleware.KeelMiddleware`: a context variable, not
shared state, so concurrent requests never see each other's id.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
from typing import Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "keel_request_id", default=None
)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, and ``[request <id>]`` after the level when logged while serving
    a request (the JSON records had the id; the default text log had none)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        current = request_id.get()
        if current is None:
            return line
        head = f"{record.levelname} "
        return line.replace(head, f"{head}[request {current}] ", 1)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(log_format: LogFormat, level: int = logging.INFO) -> None:
    """Route every logger (uvicorn's too) through one stderr handler in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every upstream request at INFO: a line per completion is noise, and cost.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
