"""Signing in and out: the people issuer's OpenID Connect provider, or in dev mode a plain
form that mints a dev person token."""

from __future__ import annotations

import hmac
import re
from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import RedirectResponse, Response

from broker.bounds import shown
from broker.console.oidc import SigninFailed
from broker.console.session import MAX_SESSION_S, SESSION_COOKIE, LoginState
from broker.console.web import ConsoleDep, CsrfRefused, check_csrf, render, viewer
from broker.errors import IdentityRejected, NotFound
from broker.identity.types import Person

router = APIRouter()
dev_router = APIRouter()
HOME = "/console/approvals"
ROLES = ("approver", "auditor", "admin")
OAUTH_ERROR = re.compile(r"[a-z_]{1,64}")


@router.get("/")
def home(request: Request) -> Response:
    target = HOME if request.cookies.get(SESSION_COOKIE) else "/console/signin"
    return RedirectResponse(target, status_code=303)


@router.get("/signin")
def signin_page(request: Request, console: ConsoleDep) -> Response:
    dev = console.broker.dev_issuer
    dev_form = dev is not None and dev.people is not None
    token = console.cookies.form_token(dict(request.cookies)) if dev_form else ""
    response = _signin(request, console, dev_form=dev_form, form_csrf=token)
    if dev_form:
        console.cookies.keep_form_token(response, token)
    return response


def _signin(
    request: Request,
    console: ConsoleDep,
    *,
    dev_form: bool = False,
    form_csrf: str = "",
    error: str | None = None,
) -> Response:
    return render(
        request,
        console,
        "signin.html",
        None,
        status=401 if error else 200,
        issuers=sorted(console.signins),
        dev_signin=dev_form,
        roles=ROLES,
        error=error,
        form_csrf=form_csrf,
    )


@router.get("/login/{issuer}")
def login(issuer: str, console: ConsoleDep) -> Response:
    """Send the browser to the issuer's authorization endpoint, remembering the sign-in."""
    signin = console.signins.get(issuer)
    if signin is None:
        raise NotFound(f"no people issuer {shown(issuer)} with a console client")
    started = signin.start()
    response = RedirectResponse(started.url, status_code=303)
    console.cookies.start_login(
        response, LoginState(issuer, started.state, started.nonce, started.code_verifier)
    )
    return response


def _signed_in(request: Request, console: ConsoleDep, id_token: str, person: Person) -> Response:
    """The page that follows a sign-in: a same-site step before the console, because the
    Strict session cookie is not sent on the redirect chain that came from the provider."""
    response = render(request, console, "signed_in.html", None, person=person, home=HOME)
    console.cookies.start_session(response, id_token, person.expires_at)
    return response


def _unanswerable(
    console: ConsoleDep,
    login: LoginState | None,
    code: str | None,
    state: str | None,
    error: str | None,
) -> str | None:
    """Why a callback cannot complete before anything is redeemed, or None."""
    if error is not None:
        # Only an error code (RFC 6749 §4.1.2.1: a-z and _) is shown: anyone can link here.
        said = error if OAUTH_ERROR.fullmatch(error) else "an error"
        return f"the identity provider refused the sign-in: {said}"
    if login is None or login.issuer not in console.signins:
        return "this sign-in was not started here, or took longer than 10 minutes"
    if state is None or not hmac.compare_digest(state.encode(), login.state.encode()):
        # NOTE: state ties the answer to the browser that started the sign-in (login CSRF).
        return "the sign-in answer does not belong to this browser's sign-in (state)"
    if code is None:
        return "the sign-in answer carries no code"
    return None


@router.get("/callback")
def callback(
    request: Request,
    console: ConsoleDep,
    code: str | None = None,
    state: str | None = None,
    error: str | None = None,
) -> Response:
    """Where the provider sends the browser back: check ``state`` against the login cookie,
    redeem the code with the PKCE verifier, verify the ID token and its nonce."""
    login = console.cookies.login(dict(request.cookies))
    problem = _unanswerable(console, login, code, state, error)
    if problem is not None or login is None or code is None:
        response = _failed(request, console, problem or "")
    else:
        try:
            id_token, person = console.signins[login.issuer].finish(
                console.broker.verifier,
                code=code,
                code_verifier=login.code_verifier,
                nonce=login.nonce,
            )
        except SigninFailed as exc:
            response = _failed(request, console, str(exc))
        except IdentityRejected as exc:
            response = _failed(request, console, f"the ID token was refused: {exc.description}")
        else:
            response = _signed_in(request, console, id_token, person)
    console.cookies.end_login(response)  # a login state is used once, whatever the outcome
    return response


def _failed(request: Request, console: ConsoleDep, why: str) -> Response:
    return _signin(request, console, error=why)


@router.post("/signout")
def signout(
    request: Request, console: ConsoleDep, csrf: Annotated[str | None, Form()] = None
) -> Response:
    check_csrf(viewer(request, console), csrf)
    response = RedirectResponse("/console/signin", status_code=303)
    console.cookies.end_session(response)
    return response


@dev_router.post("/dev/signin")
def dev_signin(
    request: Request,
    console: ConsoleDep,
    name: Annotated[str, Form(min_length=1, max_length=200)],
    roles: Annotated[list[str] | None, Form()] = None,
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    """DEV ONLY: sign in as anyone with any roles (a dev person token, verified as usual)."""
    dev = console.broker.dev_issuer
    if dev is None:  # defence in depth: the router is mounted only in dev mode
        raise NotFound("not found")
    if not console.cookies.form_token_matches(dict(request.cookies), csrf):
        raise CsrfRefused()
    token = dev.mint(sub=name.strip(), roles=list(roles or []), ttl=MAX_SESSION_S)
    return _signed_in(request, console, token, console.broker.verifier.verify_person(token))
