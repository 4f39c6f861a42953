"""Rollback tests: a workload that the policy allows ``rollback-test`` on a model reports one
with its own identity token; approvers, auditors and admins read them. Only these recorded
tests satisfy ``rollback_tested: required`` (docs/approvals.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from broker.api.deps import (
    BrokerDep,
    Permission,
    PersonDep,
    WorkloadDep,
    listed_models,
)
from broker.approvals.rollback_tests import ROLLBACK_TEST, Authorise
from broker.backends.base import TOKEN_TYPE_JWT
from broker.grants.service import ExchangeRequest, GrantService
from broker.identity.types import WorkloadIdentity
from broker.policy import Decision

router = APIRouter(prefix="/v1", tags=["rollback tests"])


def _authorise(grants: GrantService) -> Authorise:
    """The exchange's own decision (and refusal texts) for ``rollback-test`` via jwt."""

    def authorise(identity: WorkloadIdentity, model: str) -> Decision:
        req = ExchangeRequest(
            subject_token="", model=model, action=ROLLBACK_TEST, token_type=TOKEN_TYPE_JWT
        )
        return grants.decide(identity, req, "jwt")[0]

    return authorise


@router.post("/rollback-tests", status_code=201)
def report(
    body: Annotated[Any, Body()], broker: BrokerDep, workload: WorkloadDep
) -> dict[str, Any]:
    """Record a rollback test (``model``, ``rollback_point`` {uri, sha256}, ``result``,
    ``evidence_uri``?, ``started_at``?, ``finished_at``?). The body is checked after the bearer
    verified, so that every refusal of a verified token is recorded and spends it."""
    return broker.rollback_tests.report(workload, body, authorise=_authorise(broker.grants))


@router.get("/rollback-tests")
def list_tests(
    broker: BrokerDep,
    person: PersonDep,
    model: str | None = None,
    uri: str | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    """Recorded rollback tests, newest first."""
    models = listed_models(broker, person, Permission.READ_APPROVALS, model)
    found = broker.rollback_tests.find(model=model, uri=uri, limit=limit, models=models)
    return {"rollback_tests": found}
