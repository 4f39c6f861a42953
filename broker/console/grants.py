"""Grant pages: search, one grant, revoke one (admins), and revoke every active grant of a
model after a confirmation step (admins)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import RedirectResponse, Response

from broker.api.deps import Permission, require
from broker.bounds import shown
from broker.console.approvals import checked_reason
from broker.console.web import ConsoleDep, ViewerDep, check_csrf, render
from broker.errors import BrokerError, InvalidRequest
from broker.grants.model import GrantStatus

router = APIRouter()
STATUSES = ("active", "expired", "revoked")


@router.get("/grants")
def search(
    request: Request,
    console: ConsoleDep,
    who: ViewerDep,
    model: str = "",
    subject: str = "",
    status: str = "",
) -> Response:
    require(who.person, Permission.READ_GRANTS)
    error = None
    grants = []
    try:
        grants = console.broker.grants.find(
            model=model.strip() or None,
            subject=subject.strip() or None,
            status=status or None,
            limit=200,
        )
    except BrokerError as exc:
        error = exc.description
    return render(
        request,
        console,
        "grants.html",
        who,
        grants=grants,
        query={"model": model, "subject": subject, "status": status},
        statuses=STATUSES,
        models=sorted(console.broker.policy.policy.models),
        error=error,
    )


def _grant_page(
    request: Request,
    console: ConsoleDep,
    who: ViewerDep,
    grant_id: str,
    error: BrokerError | None = None,
) -> Response:
    require(who.person, Permission.READ_GRANTS)
    grant = console.broker.grants.get(grant_id)
    return render(
        request,
        console,
        "grant.html",
        who,
        status=error.status if error else 200,
        grant=grant,
        revocable=grant.status is GrantStatus.ACTIVE,
        error=error.description if error else None,
    )


@router.get("/grants/{grant_id}")
def show(grant_id: str, request: Request, console: ConsoleDep, who: ViewerDep) -> Response:
    return _grant_page(request, console, who, grant_id)


@router.post("/grants/{grant_id}/revoke")
def revoke(
    grant_id: str,
    request: Request,
    console: ConsoleDep,
    who: ViewerDep,
    reason: Annotated[str | None, Form()] = None,
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    check_csrf(who, csrf)
    require(who.person, Permission.REVOKE_GRANTS)
    try:
        console.broker.grants.revoke(grant_id, who.person, checked_reason(reason))
    except BrokerError as exc:
        return _grant_page(request, console, who, grant_id, error=exc)
    return RedirectResponse(f"/console/grants/{grant_id}", status_code=303)


def _model(console: ConsoleDep, model: str) -> str:
    if model not in console.broker.policy.policy.models:
        raise InvalidRequest(f"model: {shown(model)} is not a model of the policy")
    return model


@router.get("/revocations")
def confirm_bulk(request: Request, console: ConsoleDep, who: ViewerDep, model: str) -> Response:
    """The confirmation step of a bulk revocation: what it would revoke, and the form."""
    require(who.person, Permission.REVOKE_GRANTS)
    active = console.broker.grants.find(model=_model(console, model), status="active", limit=1000)
    return render(request, console, "revoke_model.html", who, model=model, active=active)


@router.post("/revocations")
def bulk_revoke(
    request: Request,
    console: ConsoleDep,
    who: ViewerDep,
    model: Annotated[str | None, Form()] = None,
    reason: Annotated[str | None, Form()] = None,
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    check_csrf(who, csrf)
    require(who.person, Permission.REVOKE_GRANTS)
    ids = console.broker.grants.revoke_matching(
        actor=who.person, reason=checked_reason(reason), model=_model(console, model or "")
    )
    return render(request, console, "revoked.html", who, model=model, ids=ids)
