"""The FastAPI app factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.api import admin, approvals, audit, dev, heap, public, rollback_tests, token
from broker.api.bodies import BodyLimit
from broker.api.clients import ClientAddresses, parse_networks
from broker.api.requests import RequestContext
from broker.bounds import capped
from broker.console.app import PREFIX as CONSOLE
from broker.console.app import create_console
from broker.errors import BrokerError, Unauthenticated
from broker.runtime import Broker, build_broker
from broker.settings import Settings


async def _broker_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BrokerError)
    headers = {"Cache-Control": "no-store"}
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    # The same disclosure as POST /v1/token (a workload opening an approval request is refused
    # by the same policy decision).
    disclose = request.app.state.broker.grants.explain_denials
    return token.error_response(exc, headers, disclose=disclose)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method, a body that does not parse) in
    the broker's error shape, naming what was asked."""
    assert isinstance(exc, StarletteHTTPException)
    code = "not_found" if exc.status_code == 404 else "invalid_request"
    asked = f"{request.method} {capped(request.url.path, 200)}"
    body = {"error": code, "error_description": f"{asked}: {exc.detail}"}
    headers = {**(exc.headers or {}), "Cache-Control": "no-store"}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
    body = {"error": "invalid_request", "error_description": f"{where}: {first['msg']}"}
    return JSONResponse(body, status_code=400)


class BrokerAPI(FastAPI):
    """FastAPI with ``POST /v1/token`` (served by :class:`token.TokenEndpoint`, not a route) in
    its OpenAPI document, and served past FastAPI's own outer layers."""

    _token_chain: RequestContext | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """NOTE: why (docs/performance.md): ``/v1/token``, the hot path, goes straight to the
        broker's own outermost middleware (:class:`RequestContext`, then TokenEndpoint), past
        Starlette's and FastAPI's error, telemetry and body-limit layers, which it needs none
        of: RequestContext answers an error nothing handled with a 500 in the broker's shape,
        and TokenEndpoint caps the body it reads. 0.09 ms of CPU per exchange, in process (five
        alternated runs). The first request builds the stack, through FastAPI."""
        if scope["type"] == "http" and scope["path"] == token.PATH:
            chain = self._token_chain
            if chain is None and self.middleware_stack is not None:
                chain = self._token_chain = _innermost(self.middleware_stack, RequestContext)
            if chain is not None:
                scope["app"] = self
                await chain(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = super().openapi()
            schema["paths"] = {token.PATH: token.OPENAPI, **schema.get("paths", {})}
        return super().openapi()


def _innermost(stack: ASGIApp, kind: type[RequestContext]) -> RequestContext | None:
    """The middleware of ``kind`` in ``stack`` (each layer's ``app`` is the next), or None."""
    node: Any = stack
    while node is not None and not isinstance(node, kind):
        node = getattr(node, "app", None)
    return node if isinstance(node, kind) else None


def create_app(
    settings: Settings | None = None, *, broker: Broker | None = None, serving: bool = False
) -> BrokerAPI:
    """Build the app. Pass ``broker`` to reuse one already built (tests, the CLI).
    ``serving``: the app is this process's whole work (``broker serve``): once started, its
    garbage collector is set for a long-lived heap (:func:`heap.settle`)."""
    instance = broker or build_broker(settings or Settings())

    exchanges = ThreadPoolExecutor(token.EXCHANGE_THREADS, thread_name_prefix="broker-exchange")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if serving:  # before the maintenance thread holds a round's objects
            heap.settle()
        instance.start_maintenance()
        # SQLite: the exchange's common case and its group commit on this loop (token.exchange).
        instance.grants.attach_loop(asyncio.get_running_loop())
        yield
        await instance.grants.detach_loop()  # before the threads that may wait for a commit
        # Exchanges under way finish before the store closes; the loop keeps running meanwhile
        # (a thread that queued a write just before the detach is answered by the writer thread).
        await asyncio.to_thread(exchanges.shutdown, wait=True)
        instance.close()

    app = BrokerAPI(
        title="model-credential broker",
        version="0.1.0",
        lifespan=lifespan,
        description="Short-lived credentials for one model and one action, "
        "in exchange for a workload identity token.",
    )
    app.state.broker = instance
    app.add_exception_handler(BrokerError, _broker_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # NOTE: the first middleware added is the innermost: POST /v1/token never meets BodyLimit
    # (it has its own, smaller cap and reads chunked bodies against it).
    app.add_middleware(BodyLimit)
    app.state.clients = ClientAddresses(parse_networks(instance.settings.trusted_proxies))
    app.add_middleware(
        token.TokenEndpoint, broker=instance, pool=exchanges, clients=app.state.clients
    )
    # The last added is the outermost: every answer, even one of TokenEndpoint, gets its id.
    app.add_middleware(
        RequestContext, clients=app.state.clients, access_log=instance.settings.access_log
    )
    app.include_router(token.router)
    app.include_router(admin.router)
    app.include_router(audit.router)
    app.include_router(approvals.router)
    app.include_router(rollback_tests.router)
    app.include_router(public.router)
    if instance.settings.dev:
        app.include_router(dev.router)
    app.mount(CONSOLE, create_console(instance))
    return app
