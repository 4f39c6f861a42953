"""The console as an application of its own, mounted at ``/console`` by the API's app factory:
its own error pages (HTML, not the API's JSON), security headers and static files."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import RedirectResponse, Response

from broker.console import approvals, auth, grants, records
from broker.console.oidc import CALLBACK_PATH, OidcSignin
from broker.console.session import Cookies, cookie_key, secure_cookies
from broker.console.web import (
    HERE,
    Console,
    CsrfRefused,
    SecurityHeaders,
    SignedOut,
    Viewer,
    console_of,
    render,
    templates,
    viewer,
)
from broker.errors import BrokerError
from broker.runtime import Broker

PREFIX = "/console"


def signins(broker: Broker) -> dict[str, OidcSignin]:
    """A sign-in for every people issuer of the policy with a ``console`` client."""
    found = {}
    default_redirect = broker.issuer_url.rstrip("/") + CALLBACK_PATH
    for issuer in broker.policy.policy.issuers:
        if issuer.kind != "people" or issuer.console is None:
            continue
        found[issuer.name] = OidcSignin(
            issuer,
            issuer.console,
            secret=broker.policy.console_secrets.get(issuer.name),
            redirect_url=issuer.console.redirect_url or default_redirect,
        )
    return found


def _page(request: Request, status: int, title: str, message: str) -> Response:
    """An error page, in the frame of the viewer when one is signed in (to sign out)."""
    console = console_of(request)
    try:
        who: Viewer | None = viewer(request, console)
    except SignedOut:
        who = None
    return render(request, console, "error.html", who, status=status, title=title, message=message)


async def _signed_out(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignedOut)
    if request.method == "GET":
        return RedirectResponse(f"{PREFIX}/signin", status_code=303)
    return _page(request, 401, "Signed out", f"Sign in again: {exc.why}.")


async def _csrf(request: Request, _exc: Exception) -> Response:
    return _page(
        request,
        403,
        "Form refused",
        "This form did not carry this session's CSRF token. Reload the page and try again.",
    )


async def _broker_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BrokerError)
    return _page(request, exc.status, exc.code.replace("_", " "), exc.description)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return _page(request, exc.status_code, "Not here", str(exc.detail))


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
    return _page(request, 400, "Invalid request", f"{where}: {first['msg']}")


def create_console(broker: Broker) -> FastAPI:
    """The console application for ``broker``, to be mounted at :data:`PREFIX`."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    secure = secure_cookies(broker.issuer_url)
    app.state.console = Console(
        broker=broker,
        cookies=Cookies(cookie_key(broker.keystore), secure=secure),
        templates=templates(),
        signins=signins(broker),
    )
    app.add_exception_handler(SignedOut, _signed_out)
    app.add_exception_handler(CsrfRefused, _csrf)
    app.add_exception_handler(BrokerError, _broker_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_middleware(SecurityHeaders)
    app.include_router(auth.router)
    if broker.settings.dev:
        app.include_router(auth.dev_router)
    app.include_router(approvals.router)
    app.include_router(grants.router)
    app.include_router(records.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    return app
