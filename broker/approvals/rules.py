"""The approval rules, pure: what a request binds to, its states, who counts as which person
and who may review it (the rollback gate is :mod:`broker.approvals.rollback`). No I/O;
:mod:`broker.approvals.service` applies them to the store."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from broker.audit.log import canonical_json
from broker.bounds import capped, shown
from broker.identity.types import Person
from broker.policy.engine import claim_text
from broker.policy.model import Policy

MAX_CHANGES_SHOWN = 8
"""How many differing fields a refusal names (then how many more there are)."""


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
    """Exactly what an approval covers: who asks, for what, with what, and the credential it
    will get (backend, token type, audience, lifetime). Changing any field needs a new
    approval."""

    issuer: str
    subject: str
    claims: Mapping[str, str]
    model: str
    action: str
    backend: str
    requested_token_type: str
    audience: str
    ttl_seconds: int
    """The lifetime the credential will get (the requested TTL capped by the policy)."""
    lineage: Mapping[str, Any] | None
    reason: str | None
    policy_digest: str
    emergency_grant: str | None = None
    """For the review of a break-glass use: the grant already issued. Such a binding never
    equals an ordinary request's, so its approval ratifies and covers no exchange."""

    def as_dict(self) -> dict[str, Any]:
        extra = {"emergency_grant": self.emergency_grant} if self.emergency_grant else {}
        return {
            **extra,
            "issuer": self.issuer,
            "subject": self.subject,
            "claims": dict(self.claims),
            "model": self.model,
            "action": self.action,
            "backend": self.backend,
            "requested_token_type": self.requested_token_type,
            "audience": self.audience,
            "ttl_seconds": self.ttl_seconds,
            "lineage": dict(self.lineage) if self.lineage is not None else None,
            "reason": self.reason,
            "policy_digest": self.policy_digest,
        }

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(canonical_json(self.as_dict())).hexdigest()


def binding_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], *, prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """Each field in which ``after`` differs from ``before``, as (field, before, after); fields
    that are mappings on both sides are compared member by member (``lineage.datasets``)."""
    keys = [*before, *(k for k in after if k not in before)]
    changes: list[tuple[str, Any, Any]] = []
    for key in keys:
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changes += binding_changes(old, new, prefix=f"{prefix}{key}.")
        else:
            changes.append((f"{prefix}{key}", old, new))
    return changes


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """``field: approved X, requested Y; ...``, each value capped (broker.bounds.capped), at
    most MAX_CHANGES_SHOWN fields and then how many more."""
    parts = [
        f"{field}: approved {_value_text(old)}, requested {_value_text(new)}"
        for field, old, new in changes[:MAX_CHANGES_SHOWN]
    ]
    more = len(changes) - MAX_CHANGES_SHOWN
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _value_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return shown(value)
    return capped(json.dumps(value, sort_keys=True, ensure_ascii=False))


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
    """The people (``policy.people``) that this identity maps to: by its subject, or by a claim
    of its token (a claim value as the policy engine compares it, see ``claim_text``).

    NOTE: subjects and claim values match ignoring case (``Alice@example.com`` is
    ``alice@example.com``; GitHub logins and e-mail addresses are case-insensitive in
    practice). Matching too much only makes separation of duties stricter; matching too little
    would let one person act twice."""
    folded = subject.casefold()
    names = set()
    for person, refs in policy.people.items():
        for ref in refs:
            if ref.issuer != issuer:
                continue
            if ref.subject is not None and ref.subject.casefold() == folded:
                names.add(person)
            if ref.claim is not None and ref.value is not None:
                value = claim_text(claims.get(ref.claim))
                if value is not None and value.casefold() == ref.value.casefold():
                    names.add(person)
    return names


Someone = tuple[str, ...]
"""A key of who an identity counts as: ``("person", name)`` or ``("identity", issuer,
casefolded subject)``."""


def counts_as(
    policy: Policy, issuer: str, subject: str, claims: Mapping[str, Any] | None = None
) -> frozenset[Someone]:
    """Who an identity counts as for separation of duties: the identity itself (its subject
    ignoring case) and every person ``people`` maps it to. Two identities that share a key
    are the same someone."""
    people = persons_of(policy, issuer, subject, claims or {})
    return frozenset({("identity", issuer, subject.casefold())} | {("person", p) for p in people})


def _named(keys: Iterable[Someone]) -> str:
    people = sorted(k[1] for k in keys if k[0] == "person")
    return ", ".join(people)


def distinct_people(policy: Policy, reviewers: Iterable[tuple[str, str]]) -> int:
    """How many different people these (issuer, subject) reviewers are: an identity that
    counts as someone already counted adds nothing."""
    seen: set[Someone] = set()
    count = 0
    for issuer, subject in reviewers:
        keys = counts_as(policy, issuer, subject)
        if not keys & seen:
            count += 1
        seen |= keys
    return count


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
    requester, directly or through an identity the policy maps to the same person) or ``twice``
    (this person reviewed it already, through this identity or another of theirs).
    """
    if not reviewer.has_role("approver"):
        return (
            "role",
            f"{reviewer.subject} needs role approver; has {sorted(reviewer.roles) or 'none'}",
        )
    allowed = policy.models[model].approvers if model in policy.models else []
    if allowed and not reviewer.groups & set(allowed):
        return "role", f"only members of {allowed} may review requests for model {model}"
    # NOTE: separation of duties is by person: the same identity (ignoring case), or the same
    # person through a second identity that the policy maps to them, never reviews their own
    # request, and counts once.
    me = counts_as(policy, reviewer.issuer_name, reviewer.subject)
    issuer, subject, claims = requester
    shared = me & counts_as(policy, issuer, subject, claims)
    if shared:
        who = _named(shared)
        through = f" ({who}, through another identity)" if who else ""
        return "self", f"the requester cannot review their own request{through}"
    for issuer, subject in earlier_reviewers:
        shared = me & counts_as(policy, issuer, subject)
        if shared:
            who = _named(shared)
            done = (
                f"{who} has already reviewed this request (as {shown(subject)} of {issuer})"
                if who
                else f"{shown(reviewer.subject)} has already reviewed this request"
            )
            return "twice", f"{done}; each person counts once, whichever identity they use"
    return None
