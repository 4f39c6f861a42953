"""Helpers for the grants tests: a grant written straight into a broker's store, for the reads,
revocation and introspection that start from a grant that exists."""

from __future__ import annotations

from broker.grants.model import Grant, GrantStatus
from broker.runtime import Broker
from broker.store.tables import GrantRow


def store_grant(
    broker: Broker,
    grant: Grant,
    *,
    status: GrantStatus | None = None,
    credential_ref: str | None = None,
) -> Grant:
    """Write ``grant`` as a row of ``broker``'s store (``status`` overrides the grant's; the
    credential_ref defaults to the grant id, as the jwt backend's). Returns the grant."""
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
                credential_ref=credential_ref or grant.id,
            )
        )
    return grant
