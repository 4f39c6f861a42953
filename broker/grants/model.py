"""The grant as the rest of the broker sees it (a frozen copy of its row)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from broker.store.tables import GrantRow


class GrantStatus(StrEnum):
    ISSUING = "issuing"  # an external backend is being asked; not usable yet
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"
    FAILED = "failed"  # the backend or the commit failed; nothing usable was handed out


@dataclass(frozen=True, slots=True)
class Grant:
    id: str
    issuer: str
    issuer_url: str
    subject: str
    identity_claims: dict[str, Any]
    model: str
    action: str
    tier: str
    backend: str
    rule: str
    policy_digest: str
    audience: str | None
    reason: str | None
    lineage: dict[str, Any] | None
    approval_id: str | None
    issued_at: dt.datetime
    expires_at: dt.datetime
    status: GrantStatus
    revoked_at: dt.datetime | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    backend_revocation: str | None = None

    @classmethod
    def from_row(cls, row: GrantRow, now: dt.datetime) -> Grant:
        """Copy a row; an active grant past its expiry reads as expired."""
        status = GrantStatus(row.status)
        if status is GrantStatus.ACTIVE and row.expires_at <= now:
            status = GrantStatus.EXPIRED
        return cls(
            id=row.id,
            issuer=row.issuer,
            issuer_url=row.issuer_url,
            subject=row.subject,
            identity_claims=dict(row.identity_claims),
            model=row.model,
            action=row.action,
            tier=row.tier,
            backend=row.backend,
            rule=row.rule,
            policy_digest=row.policy_digest,
            audience=row.audience,
            reason=row.reason,
            lineage=row.lineage,
            approval_id=row.approval_id,
            issued_at=row.issued_at,
            expires_at=row.expires_at,
            status=status,
            revoked_at=row.revoked_at,
            revoked_by=row.revoked_by,
            revoke_reason=row.revoke_reason,
            backend_revocation=row.backend_revocation,
        )

    def to_public(self) -> dict[str, Any]:
        """The grant as the admin API and CLI show it (no credential material exists here)."""
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, dt.datetime) else value
        out["status"] = str(self.status)
        return out
