"""What every console page shares: the console's parts, the signed-in viewer, CSRF checks,
rendering, and the security headers of every response."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.api.deps import Permission, permits, scope
from broker.console.oidc import OidcSignin
from broker.console.session import Cookies, Session, csrf_matches
from broker.errors import IdentityRejected
from broker.identity.types import Person
from broker.runtime import Broker

HERE = Path(__file__).resolve().parent

# NOTE: no inline script or style anywhere, so the policy can forbid both; forms post only to
# the console itself and no page can be framed.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response of the console (pages, errors, static
    files), and ``Cache-Control: no-store`` to all but the static files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
        static = path.removeprefix(root).startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in {h for h, _ in SECURITY_HEADERS}
                ]
                headers += SECURITY_HEADERS
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def templates() -> Jinja2Templates:
    # NOTE: autoescape on for every template: whatever a requester wrote renders as text.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return Jinja2Templates(env=env)


@dataclass
class Console:
    broker: Broker
    cookies: Cookies
    templates: Jinja2Templates
    signins: dict[str, OidcSignin] = field(default_factory=dict)
    """People issuer name → its sign-in, for issuers with a ``console`` client."""


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


ConsoleDep = Annotated[Console, Depends(console_of)]


class SignedOut(Exception):
    """No valid session: GET pages redirect to sign-in, forms are refused (401)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class CsrfRefused(Exception):
    """A form without its CSRF token, or with another one (403)."""


@dataclass(frozen=True)
class Viewer:
    """The signed-in person and their session."""

    person: Person
    session: Session


def viewer(request: Request, console: ConsoleDep) -> Viewer:
    """The person signed in to this browser: the session cookie opened and its ID token
    verified again by the broker's people verifier (expiry, keys and roles as of now)."""
    session = console.cookies.session(dict(request.cookies))
    if session is None:
        raise SignedOut("not signed in, or the session ended")
    try:
        person = console.broker.verifier.verify_person(session.id_token)
    except IdentityRejected as exc:
        raise SignedOut(f"the session's ID token no longer verifies: {exc.description}") from None
    return Viewer(person, session)


ViewerDep = Annotated[Viewer, Depends(viewer)]


def check_csrf(who: Viewer, submitted: str | None) -> None:
    """Raise CsrfRefused unless the form carried this session's CSRF token."""
    if not csrf_matches(who.session.csrf, submitted):
        raise CsrfRefused()


def render(
    request: Request,
    console: Console,
    template: str,
    who: Viewer | None,
    *,
    status: int = 200,
    **context: Any,
) -> Response:
    """``template`` with the page frame's context: the viewer, what they may do (and, for roles
    scoped to models, for which: shown on every page), dev mode."""
    can = {p.name.lower(): who is not None and permits(who.person, p) for p in Permission}
    scoped: list[str] = []
    if who is not None:
        held = [scope(console.broker, who.person, p) for p in Permission if permits(who.person, p)]
        scoped = sorted({a.describe() for a in held if not a.unscoped})
    return console.templates.TemplateResponse(
        request,
        template,
        {
            "viewer": who.person if who else None,
            "csrf": who.session.csrf if who else None,
            "session_ends": who.session.expires_at if who else None,
            "can": can,
            "scoped": scoped,
            "dev": console.broker.settings.dev,
            **context,
        },
        status_code=status,
    )
