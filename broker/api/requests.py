"""Every HTTP request gets an id (``X-Request-ID``), carried by its log lines and returned on
its answer, and, with ``BROKER_ACCESS_LOG``, one access log line."""

from __future__ import annotations

import logging
import random
import re
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.api.clients import ClientAddresses
from broker.bounds import capped
from broker.logs import REQUEST_ID

HEADER = "X-Request-ID"
MAX_REQUEST_ID_CHARS = 128
SANE_REQUEST_ID = re.compile(rf"[A-Za-z0-9._~:/+=@-]{{1,{MAX_REQUEST_ID_CHARS}}}")
"""An incoming id is kept only if it looks like one (a UUID, a trace id, base64): bounded and
with no space, quote or control character, so it cannot forge or break a log line."""
MAX_LOGGED_PATH_CHARS = 200
NO_STORE = {"Cache-Control": "no-store"}

log = logging.getLogger("broker.api")
access = logging.getLogger("broker.access")


def request_id(scope: Scope) -> str:
    """The caller's ``X-Request-ID`` if it is sane, else a new random one (32 hex digits).

    NOTE: an id is for finding log lines, not a secret, so it comes from ``random`` (no system
    call): ``os.urandom`` releases the GIL on the event loop, and under load a busy exchange
    thread then holds it, stalling the loop (measured: docs/performance.md)."""
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given: str = value.decode("latin-1")
            if SANE_REQUEST_ID.fullmatch(given):
                return given
            break
    return f"{random.getrandbits(128):032x}"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _method(scope: Scope) -> str:
    return _printable(capped(scope["method"], 20))


def _path(scope: Scope) -> str:
    """The request's path as logged: never its query string, capped, control characters
    escaped (a percent-decoded path may hold a newline)."""
    return _printable(capped(scope["path"], MAX_LOGGED_PATH_CHARS))


class RequestContext:
    """The outermost middleware: the request id (in :data:`broker.logs.REQUEST_ID` while the
    request is served, and in the ``X-Request-ID`` header of every answer, errors included),
    the access log line, and a 500 in the broker's error shape, logged with the request id,
    for an exception nothing else handled.

    NOTE: the access log has the method, the path without its query string (a caller may put
    a token there), the status, the duration, the client (as :class:`ClientAddresses` names
    it) and the request id; never a body or a header."""

    def __init__(self, app: ASGIApp, clients: ClientAddresses, access_log: bool) -> None:
        self.app = app
        self.clients = clients
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        header = (b"x-request-id", rid.encode("latin-1"))
        token = REQUEST_ID.set(rid)
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("%s %s failed unexpectedly", _method(scope), _path(scope))
            if status == 0:
                body = {"error": "server_error", "error_description": "the broker failed"}
                await JSONResponse(body, 500, NO_STORE)(scope, receive, send_with_id)
        finally:
            if self.access_log:
                self._log(scope, status, time.perf_counter() - started)
            REQUEST_ID.reset(token)

    def _log(self, scope: Scope, status: int, seconds: float) -> None:
        fields = {
            "method": _method(scope),
            "path": _path(scope),
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "client": self.clients.of(scope),
        }
        access.info(
            "%s %s %d %.1fms client=%s",
            fields["method"],
            fields["path"],
            status,
            fields["duration_ms"],
            fields["client"],
            extra={"fields": fields},
        )
