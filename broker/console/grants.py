"""Grant pages: search, one grant, revoke one (admins), and revoke every active grant of a
model after a confirmation step (admins). A role scoped to models (broker.policy.roles) sees
and acts on those models only, decided by broker.api.deps as for the API."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from starlette.responses import RedirectResponse, Response

from broker.api.deps import Permission, model_access, permits, require_model, scope
from broker.bounds import shown
from broker.console.approvals import checked_reason
from broker.console.web import ConsoleDep, Viewer, ViewerDep, check_csrf, render
from broker.errors import BrokerError, InvalidRequest
from broker.grants.model import Grant, GrantStatus

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
    broker = console.broker
    access = model_access(broker, who.person, Permission.READ_GRANTS)
    if model.strip():
        require_model(access, who.person, model.strip())
    every = sorted(broker.policy.policy.models)
    error = None
    grants = []
    try:
        grants = broker.grants.find(
            model=model.strip() or None,
            subject=subject.strip() or None,
            status=status or None,
            limit=200,
            models=access.models_in(every),
        )
    except BrokerError as exc:
        error = exc.description
    revoking = scope(broker, who.person, Permission.REVOKE_GRANTS)
    return render(
        request,
        console,
        "grants.html",
        who,
        grants=grants,
        query={"model": model, "subject": subject, "status": status},
        statuses=STATUSES,
        models=[m for m in every if access.allows(m)],
        bulk_revocable=model in every and revoking.allows(model),
        error=error,
    )


def _revoke_refusal(console: ConsoleDep, who: Viewer, grant: Grant) -> str | None:
    """Why the viewer may not revoke ``grant`` (None: the button is offered): what revoke()
    would refuse with the viewer's admin role."""
    if not permits(who.person, Permission.REVOKE_GRANTS):
        return "revoking needs role admin"
    refused = console.broker.grants.revoke_refusal(
        scope(console.broker, who.person, Permission.REVOKE_GRANTS),
        who.person,
        grant_id=grant.id,
        model=grant.model,
        action=grant.action,
    )
    return refused.description if refused is not None else None


def _grant_page(
    request: Request,
    console: ConsoleDep,
    who: ViewerDep,
    grant_id: str,
    error: BrokerError | None = None,
) -> Response:
    access = model_access(console.broker, who.person, Permission.READ_GRANTS)
    grant = console.broker.grants.get(grant_id)
    require_model(access, who.person, grant.model)
    refusal = _revoke_refusal(console, who, grant)
    return render(
        request,
        console,
        "grant.html",
        who,
        status=error.status if error else 200,
        grant=grant,
        revocable=grant.status is GrantStatus.ACTIVE and refusal is None,
        # Shown only to admins: why an active grant has no revoke button (the rollback path).
        revoke_refusal=refusal if permits(who.person, Permission.REVOKE_GRANTS) else None,
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
    access = model_access(console.broker, who.person, Permission.REVOKE_GRANTS)
    try:
        console.broker.grants.revoke(grant_id, who.person, checked_reason(reason), access)
    except BrokerError as exc:
        return _grant_page(request, console, who, grant_id, error=exc)
    return RedirectResponse(f"/console/grants/{grant_id}", status_code=303)


def _model(console: ConsoleDep, model: str) -> str:
    if model not in console.broker.policy.policy.models:
        raise InvalidRequest(f"model: {shown(model)} is not a model of the policy")
    return model


@router.get("/revocations")
def confirm_bulk(request: Request, console: ConsoleDep, who: ViewerDep, model: str) -> Response:
    """The confirmation step of a bulk revocation: what it would revoke, what it would spare
    (the owners' rollback path, for a scoped admin), and the form."""
    broker = console.broker
    access = model_access(broker, who.person, Permission.REVOKE_GRANTS)
    require_model(access, who.person, model)
    found = broker.grants.find(model=_model(console, model), status="active", limit=1000)
    spared = [
        g
        for g in found
        if broker.grants.revoke_refusal(
            access, who.person, grant_id=g.id, model=g.model, action=g.action
        )
    ]
    active = [g for g in found if g not in spared]
    return render(
        request, console, "revoke_model.html", who, model=model, active=active, spared=spared
    )


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
    access = model_access(console.broker, who.person, Permission.REVOKE_GRANTS)
    spared: list[str] = []
    ids = console.broker.grants.revoke_matching(
        actor=who.person,
        reason=checked_reason(reason),
        model=_model(console, model or ""),
        access=access,
        spared=spared,
    )
    return render(request, console, "revoked.html", who, model=model, ids=ids, spared=spared)
