"""A bound on every request body the API reads (``POST /v1/token`` has its own, smaller one)."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

MAX_BODY_BYTES = 256 * 1024
"""The largest body of an admin, approval or introspection request; the largest legitimate one
(an approval request with a 16 KiB lineage) is far smaller."""


def _refusal(status: int, text: str) -> JSONResponse:
    body = {"error": "invalid_request", "error_description": text}
    return JSONResponse(body, status, {"Cache-Control": "no-store"})


class BodyLimit:
    """Refuses, before reading it, a body over MAX_BODY_BYTES (413) or one that does not declare
    its length (411): a chunked body could otherwise grow without bound."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers", ()))
            length = headers.get(b"content-length")
            if length is None and b"transfer-encoding" in headers:
                refusal = _refusal(411, "body: send it with a Content-Length")
                await refusal(scope, receive, send)
                return
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
                await _refusal(413, f"body: larger than {MAX_BODY_BYTES} bytes")(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)
