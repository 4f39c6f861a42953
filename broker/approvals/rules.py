"""The approval rules, pure: what a request binds to, its states and who may review it (the
rollback gate is :mod:`broker.approvals.rollback`). No I/O; :mod:`broker.approvals.service`
applies them to the store."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from broker.audit.log import canonical_json
from broker.identity.types import Person
from broker.policy.model import Policy


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    USED = "used"


FINAL = frozenset(
    {ApprovalState.DENIED, ApprovalState.CANCELLED, ApprovalState.EXPIRED, ApprovalState.USED}
)


@dataclass(frozen=True)
class Binding:
    """Exactly what an approval covers. Changing any field needs a new approval."""

    issuer: str
    subject: str
    claims: Mapping[str, str]
    model: str
    action: str
    backend: str
    lineage: Mapping[str, Any] | None
    reason: str | None
    policy_digest: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "subject": self.subject,
            "claims": dict(self.claims),
            "model": self.model,
            "action": self.action,
            "backend": self.backend,
            "lineage": dict(self.lineage) if self.lineage is not None else None,
            "reason": self.reason,
            "policy_digest": self.policy_digest,
        }

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(canonical_json(self.as_dict())).hexdigest()


def differences(approved: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """The binding fields in which a request differs from what was approved."""
    return [key for key in approved if approved[key] != requested.get(key)]


def effective_state(
    status: str,
    *,
    now: dt.datetime,
    expires_at: dt.datetime,
    approved_until: dt.datetime | None,
) -> ApprovalState:
    """The state now: pending past its deadline, or approved past its validity, is expired."""
    state = ApprovalState(status)
    if state is ApprovalState.PENDING and expires_at <= now:
        return ApprovalState.EXPIRED
    if state is ApprovalState.APPROVED and approved_until is not None and approved_until <= now:
        return ApprovalState.EXPIRED
    return state


def persons_of(policy: Policy, issuer: str, subject: str, claims: Mapping[str, Any]) -> set[str]:
    """The people (``policy.people``) that this identity maps to."""
    names = set()
    for person, refs in policy.people.items():
        for ref in refs:
            if ref.issuer != issuer:
                continue
            if ref.subject is not None and ref.subject == subject:
                names.add(person)
            if ref.claim is not None and str(claims.get(ref.claim)) == ref.value:
                names.add(person)
    return names


def review_refusal(
    policy: Policy,
    reviewer: Person,
    *,
    model: str,
    requester: tuple[str, str, Mapping[str, Any]],
    earlier_reviewers: Iterable[tuple[str, str]],
) -> tuple[str, str] | None:
    """Why ``reviewer`` may not review this request, as (kind, message), or None.

    kind is ``role`` (no approver role, or not in the model's approver groups), ``self`` (the
    requester, directly or through an identity the policy maps to the same person) or ``twice``.
    """
    if not reviewer.has_role("approver"):
        return (
            "role",
            f"{reviewer.subject} needs role approver; has {sorted(reviewer.roles) or 'none'}",
        )
    allowed = policy.models[model].approvers if model in policy.models else []
    if allowed and not reviewer.groups & set(allowed):
        return "role", f"only members of {allowed} may review requests for model {model}"
    issuer, subject, claims = requester
    # NOTE: separation of duties: the same issuer + subject, or the same person through a
    # second identity that the policy maps to them, never reviews their own request.
    if (reviewer.issuer_name, reviewer.subject) == (issuer, subject):
        return "self", "the requester cannot review their own request"
    mine = persons_of(policy, reviewer.issuer_name, reviewer.subject, {})
    theirs = persons_of(policy, issuer, subject, claims)
    if mine & theirs:
        who = ", ".join(sorted(mine & theirs))
        return (
            "self",
            f"the requester cannot review their own request ({who}, through another identity)",
        )
    if (reviewer.issuer_name, reviewer.subject) in set(earlier_reviewers):
        return (
            "twice",
            f"{reviewer.subject} has already reviewed this request; each reviewer counts once",
        )
    return None
