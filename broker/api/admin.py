"""Admin routes: grants (auditor or admin reads, admin revokes) and signing-key rotation."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from broker.api.deps import (
    BrokerDep,
    Permission,
    PersonDep,
    listed_models,
    model_access,
    require_model,
    require_unscoped,
)

router = APIRouter(prefix="/v1", tags=["admin"])


class RevokeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=1000)


class BulkRevokeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    subject: str | None = None
    issuer: str | None = None
    reason: str = Field(min_length=1, max_length=1000)


@router.get("/grants")
def list_grants(
    broker: BrokerDep,
    person: PersonDep,
    model: str | None = None,
    subject: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> dict[str, Any]:
    models = listed_models(broker, person, Permission.READ_GRANTS, model)
    found = broker.grants.find(
        model=model, subject=subject, status=status, limit=limit, models=models
    )
    return {"grants": [g.to_public() for g in found]}


@router.get("/grants/{grant_id}")
def show_grant(grant_id: str, broker: BrokerDep, person: PersonDep) -> dict[str, Any]:
    access = model_access(broker, person, Permission.READ_GRANTS)
    grant = broker.grants.get(grant_id)
    require_model(access, person, grant.model)
    return grant.to_public()


@router.post("/grants/{grant_id}/revoke")
def revoke_grant(
    grant_id: str, body: RevokeBody, broker: BrokerDep, person: PersonDep
) -> dict[str, Any]:
    access = model_access(broker, person, Permission.REVOKE_GRANTS)
    return broker.grants.revoke(grant_id, person, body.reason, access).to_public()


@router.post("/revocations")
def bulk_revoke(body: BulkRevokeBody, broker: BrokerDep, person: PersonDep) -> dict[str, Any]:
    access = model_access(broker, person, Permission.REVOKE_GRANTS)
    spared: list[str] = []
    ids = broker.grants.revoke_matching(
        actor=person,
        reason=body.reason,
        model=body.model,
        subject=body.subject,
        issuer=body.issuer,
        access=access,
        spared=spared,
    )
    return {"revoked": ids, **({"spared": spared} if spared else {})}


@router.post("/keys/rotate")
def rotate_keys(broker: BrokerDep, person: PersonDep) -> dict[str, Any]:
    """The published next key starts signing; the old current stays published as previous;
    the old previous is retired (tokens it signed stop verifying at relying parties that
    refresh their JWKS); a new next key is published."""
    access = model_access(broker, person, Permission.ROTATE_KEYS)
    require_unscoped(access, person, "rotating the signing key")
    new = broker.keys.new_key()
    with broker.store.write() as session:
        # One transaction: the keys move only if the event is recorded, and the event names
        # the keys as the store had them (another replica may have rotated meanwhile).
        rotation = broker.keys.rotate(session, new)
        broker.audit.append(
            session,
            "signing_key.rotated",
            dt.datetime.now(dt.UTC),
            {
                "actor": {"issuer": person.issuer_name, "subject": person.subject},
                "kid": rotation.kid,
                "next_kid": rotation.next_kid,
                "retired_kid": rotation.retired_kid,
            },
        )
    broker.keys.refresh()
    return {"kid": rotation.kid, "next_kid": rotation.next_kid, "retired_kid": rotation.retired_kid}
