"""Approval pages: pending requests, one request with everything a reviewer judges, and the
approve and deny forms (offered only when the approval rules would accept them)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from starlette.responses import RedirectResponse, Response

from broker.api.deps import Permission, model_access, permits, require_model, scope
from broker.approvals.rules import ApprovalState
from broker.console.web import ConsoleDep, Viewer, ViewerDep, check_csrf, render
from broker.errors import BrokerError, InvalidRequest
from broker.policy.roles import ModelAccess

router = APIRouter()
MAX_REASON = 1000


def checked_reason(reason: str | None) -> str:
    """The reason a form gave (after its CSRF token was checked). Raises InvalidRequest."""
    text = (reason or "").strip()
    if not text or len(text) > MAX_REASON:
        raise InvalidRequest(f"reason: give one, at most {MAX_REASON} characters")
    return text


@router.get("/approvals")
def pending(
    request: Request, console: ConsoleDep, who: ViewerDep, status: str = "pending"
) -> Response:
    broker = console.broker
    access = model_access(broker, who.person, Permission.READ_APPROVALS)
    models = access.models_in(broker.policy.policy.models)
    requests = broker.approvals.find(status=status or None, limit=200, models=models)
    return render(
        request,
        console,
        "approvals.html",
        who,
        requests=requests,
        shown_state=status,
        states=[str(s) for s in ApprovalState],
    )


def _request_page(
    request: Request,
    console: ConsoleDep,
    who: Viewer,
    approval_id: str,
    *,
    error: BrokerError | None = None,
) -> Response:
    broker = console.broker
    access = model_access(broker, who.person, Permission.READ_APPROVALS)
    view = broker.approvals.get(approval_id)
    require_model(access, who.person, view["model"])
    # The same checks that review() applies (with the reviewer's model scope, as _review
    # passes it): a form is offered only when it would pass.
    reviewing = _review_access(console, who)
    refusals = {
        decision: broker.approvals.refusal(approval_id, who.person, decision, reviewing)
        for decision in ("approve", "deny")
    }
    lineage: dict[str, Any] = view.get("lineage") or {}
    point = lineage.get("rollback_point") if isinstance(lineage, dict) else None
    tests: list[dict[str, Any]] = []
    if isinstance(point, dict) and isinstance(point.get("uri"), str):
        tests = broker.rollback_tests.find(model=view["model"], uri=point["uri"], limit=20)
    return render(
        request,
        console,
        "approval.html",
        who,
        status=error.status if error else 200,
        view=view,
        refusals={d: (r.description if r else None) for d, r in refusals.items()},
        rollback_point=point if isinstance(point, dict) else None,
        rollback_tests=tests,
        artifacts=[
            (kind, item)
            for kind in ("datasets", "weights", "prompts")
            for item in (lineage.get(kind) or [] if isinstance(lineage, dict) else [])
        ],
        error=error.description if error else None,
    )


@router.get("/approvals/{approval_id}")
def show(approval_id: str, request: Request, console: ConsoleDep, who: ViewerDep) -> Response:
    return _request_page(request, console, who, approval_id)


def _review_access(console: ConsoleDep, who: Viewer) -> ModelAccess | None:
    """The models the viewer's approver role covers; None without the role (the approval
    rules then refuse them, naming the role)."""
    if not permits(who.person, Permission.REVIEW_APPROVALS):
        return None
    return scope(console.broker, who.person, Permission.REVIEW_APPROVALS)


def _review(
    request: Request,
    console: ConsoleDep,
    who: Viewer,
    approval_id: str,
    decision: str,
    reason: str | None,
    csrf: str | None,
) -> Response:
    check_csrf(who, csrf)
    try:
        text = checked_reason(reason)
        access = _review_access(console, who)
        console.broker.approvals.review(approval_id, who.person, decision, text, access)
    except BrokerError as exc:
        return _request_page(request, console, who, approval_id, error=exc)
    return RedirectResponse(f"/console/approvals/{approval_id}", status_code=303)


@router.post("/approvals/{approval_id}/approve")
def approve(
    approval_id: str,
    request: Request,
    console: ConsoleDep,
    who: ViewerDep,
    reason: Annotated[str | None, Form()] = None,
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    return _review(request, console, who, approval_id, "approve", reason, csrf)


@router.post("/approvals/{approval_id}/deny")
def deny(
    approval_id: str,
    request: Request,
    console: ConsoleDep,
    who: ViewerDep,
    reason: Annotated[str | None, Form()] = None,
    csrf: Annotated[str | None, Form()] = None,
) -> Response:
    return _review(request, console, who, approval_id, "deny", reason, csrf)
