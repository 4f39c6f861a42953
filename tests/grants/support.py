"""Helpers for the grants tests: grants written straight into a broker's store (for reads,
revocation and introspection that start from a grant that exists), the audit events as
decoded, and a fake of our own Backend protocol that records what it was asked."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from broker.backends.base import TOKEN_TYPE_VAULT, Credential
from broker.grants.model import Grant, GrantStatus
from broker.identity.types import Person
from broker.runtime import Broker
from broker.store.tables import EventRow, GrantRow
from tests.conftest import person_token


def store_grant(
    broker: Broker,
    grant: Grant,
    *,
    status: GrantStatus | None = None,
    credential_ref: str | None = None,
) -> Grant:
    """Write ``grant`` as a row of ``broker``'s store (``status`` overrides the grant's).
    Returns the grant."""
    with broker.store.write() as session:
        session.add(
            GrantRow(
                id=grant.id,
                issuer=grant.issuer,
                issuer_url=grant.issuer_url,
                subject=grant.subject,
                identity_claims=grant.identity_claims,
                subject_jti=None,
                model=grant.model,
                action=grant.action,
                tier=grant.tier,
                backend=grant.backend,
                rule=grant.rule,
                policy_digest=grant.policy_digest,
                audience=grant.audience,
                reason=grant.reason,
                lineage=grant.lineage,
                approval_id=grant.approval_id,
                issued_at=grant.issued_at,
                expires_at=grant.expires_at,
                status=str(status or grant.status),
                credential_ref=credential_ref,
            )
        )
    return grant


def events(broker: Broker, kind: str | None = None) -> list[dict[str, Any]]:
    """The audit log's events in order (of one ``type``, if given), as JSON."""
    with broker.store.read() as session:
        bodies = [
            json.loads(r.body) for r in session.scalars(select(EventRow).order_by(EventRow.idx))
        ]
    return [b for b in bodies if kind is None or b["type"] == kind]


def admin(broker: Broker) -> Person:
    """A verified admin, as the admin API would hand one to the grant service."""
    return broker.verifier.verify_person(person_token(broker, "admin", sub="root@example.com"))


@dataclass
class FakeBackend:
    """An external backend of our own protocol (and Reconcilable). ``live`` maps grant id to
    credential_ref of what it issued and has not revoked; each revoke takes the next of
    ``outcomes`` (True, False for unconfirmed, or an error to raise; default True)."""

    name: str = "vault"
    token_type: str = TOKEN_TYPE_VAULT
    external: bool = True
    live: dict[str, str] = field(default_factory=dict)
    revoked: list[tuple[str, str | None]] = field(default_factory=list)
    outcomes: list[bool | Exception] = field(default_factory=list)

    def issue(self, grant: Grant) -> Credential:
        ref = f"ref-{grant.id}"
        self.live[grant.id] = ref
        return Credential(f"secret-{grant.id}", self.token_type, "Bearer", grant.expires_at, ref)

    def revoke(self, grant: Grant, credential_ref: str | None) -> bool:
        self.revoked.append((grant.id, credential_ref))
        outcome = self.outcomes.pop(0) if self.outcomes else True
        if isinstance(outcome, Exception):
            raise outcome
        if outcome:
            self.live.pop(grant.id, None)
        return outcome

    def list_live(self, *, min_age_s: int = 0) -> list[tuple[str, str]]:
        return list(self.live.items())

    def revoke_ref(self, grant_id: str, credential_ref: str) -> bool:
        self.revoked.append((grant_id, credential_ref))
        self.live.pop(grant_id, None)
        return True
