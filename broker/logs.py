"""Log lines: text (the default) or one JSON object per line (``BROKER_LOG_FORMAT=json``), each
carrying the id of the request it was written for (see :mod:`broker.api.requests`).

NOTE: nothing here adds what a record does not already hold; what keeps tokens and secrets out
of the log is that no log call of the broker is given one (a test exchanges a bad token and
searches every line for it).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from contextvars import ContextVar
from typing import IO, Any, Literal

LogFormat = Literal["text", "json"]
REQUEST_ID: ContextVar[str | None] = ContextVar("broker_request_id", default=None)
"""The id of the HTTP request being served, if any (set by the API's request middleware)."""
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a call gave with ``extra={"fields": {...}}`` (the access log)."""
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id"?, "exception"?, ...fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id is not None:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        line.update(_fields(record))
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message``, then `` request_id=...`` inside a request."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id is None:
            return text
        head, newline, rest = text.partition("\n")
        return f"{head} request_id={request_id}{newline}{rest}"


_HANDLER_NAME = "broker"
QUIET_LIBRARIES = ("httpx", "httpcore", "botocore", "boto3", "urllib3", "hvac")
"""Client libraries held at WARNING whatever the level.

NOTE: httpx logs every URL it requests at INFO (a webhook URL may hold a secret in its query
string), and botocore logs response bodies at DEBUG (an AssumeRole answer is the credential
the broker hands out)."""


def configure_logging(
    log_format: LogFormat = "text", level: int | str = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every logger's records (the broker's, uvicorn's, the libraries') to one handler
    on the root logger writing ``stream`` (stderr) in ``log_format``, at ``level`` (the
    :data:`QUIET_LIBRARIES` at WARNING). Calling it again replaces the handler it installed
    before. Returns the handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler
