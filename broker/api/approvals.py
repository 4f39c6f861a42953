"""Approval requests and model lineage.

A workload opens a request with its own identity token (ahead of time, or implicitly by an
exchange that answers ``approval_required``) and may cancel it; people with the ``approver``
role review; ``auditor``/``admin`` (and approvers) read.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from broker.api.deps import (
    BrokerDep,
    Permission,
    PersonDep,
    WorkloadDep,
    authenticate_any,
    listed_models,
    model_access,
    require_model,
)
from broker.backends.base import TOKEN_TYPE_JWT
from broker.errors import Forbidden, InvalidRequest
from broker.grants.service import ExchangeRequest
from broker.identity.types import Person, WorkloadIdentity
from broker.policy import Outcome

router = APIRouter(prefix="/v1", tags=["approvals"])


AnyCallerDep = Annotated[Person | WorkloadIdentity, Depends(authenticate_any)]


class OpenBody(BaseModel):
    """The future exchange, field for field as ``POST /v1/token`` will send it: an approval
    covers exactly that request, audience and TTL included."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    action: str = Field(min_length=1)
    requested_token_type: str = TOKEN_TYPE_JWT
    audience: str | None = Field(default=None, min_length=1, max_length=2048)
    requested_ttl: StrictInt | None = Field(default=None, ge=1, le=999_999_999)
    lineage: dict[str, Any] | None = None
    reason: str | None = Field(default=None, max_length=1000)


class ReviewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=1000)


@router.post("/approvals", status_code=201)
def open_request(body: OpenBody, broker: BrokerDep, workload: WorkloadDep) -> dict[str, Any]:
    """Open (or find) the approval request for exactly this future exchange."""
    grants = broker.grants
    req = ExchangeRequest(
        subject_token="",
        model=body.model,
        action=body.action,
        token_type=body.requested_token_type,
        audience=body.audience,
        requested_ttl=body.requested_ttl,
        reason=body.reason,
        lineage=json.dumps(body.lineage) if body.lineage is not None else None,
    )
    backend = grants.backends.for_token_type(req.token_type)
    decision, lineage = grants.decide(workload, req, backend.name)
    if decision.outcome is Outcome.ALLOW:
        raise InvalidRequest(
            f"action {decision.action} is tier {decision.tier}: it needs no approval; "
            "exchange directly",
            approvals_required=0,
        )
    binding = grants.binding(workload, req, decision, lineage)
    view, _ = broker.approvals.open(decision, binding)
    return view


@router.get("/approvals")
def list_requests(
    broker: BrokerDep,
    person: PersonDep,
    status: str | None = None,
    model: str | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    models = listed_models(broker, person, Permission.READ_APPROVALS, model)
    found = broker.approvals.find(status=status, model=model, limit=limit, models=models)
    return {"approvals": found}


@router.get("/approvals/{approval_id}")
def show_request(approval_id: str, broker: BrokerDep, caller: AnyCallerDep) -> dict[str, Any]:
    view = broker.approvals.get(approval_id)
    if isinstance(caller, Person):
        access = model_access(broker, caller, Permission.READ_APPROVALS)
        require_model(access, caller, view["model"])
    elif (caller.issuer_name, caller.subject) != (
        view["requester"]["issuer"],
        view["requester"]["subject"],
    ):
        raise Forbidden("a workload may read only its own approval requests")
    return view


@router.post("/approvals/{approval_id}/approve")
def approve(
    approval_id: str, body: ReviewBody, broker: BrokerDep, person: PersonDep
) -> dict[str, Any]:
    access = model_access(broker, person, Permission.REVIEW_APPROVALS)
    return broker.approvals.review(approval_id, person, "approve", body.reason, access)


@router.post("/approvals/{approval_id}/deny")
def deny(
    approval_id: str, body: ReviewBody, broker: BrokerDep, person: PersonDep
) -> dict[str, Any]:
    access = model_access(broker, person, Permission.REVIEW_APPROVALS)
    return broker.approvals.review(approval_id, person, "deny", body.reason, access)


@router.post("/approvals/{approval_id}/cancel")
def cancel(
    approval_id: str, body: ReviewBody, broker: BrokerDep, workload: WorkloadDep
) -> dict[str, Any]:
    return broker.approvals.cancel(approval_id, workload, body.reason)


@router.get("/lineage/{model}", tags=["lineage"])
def lineage(model: str, broker: BrokerDep, person: PersonDep, limit: int = 100) -> dict[str, Any]:
    """Every grant for a model-altering action on ``model``: who, when, approvals, lineage."""
    require_model(model_access(broker, person, Permission.READ_APPROVALS), person, model)
    return {"model": model, "history": broker.grants.lineage(model, limit=limit)}
