"""The pure approval rules: separation of duties, states, bindings (the rollback gate:
tests/approvals/test_rollback.py)."""

from __future__ import annotations

import datetime as dt

from broker.approvals.rules import (
    ApprovalState,
    Binding,
    differences,
    effective_state,
    review_refusal,
)
from broker.identity.types import Person, _seal_person
from broker.policy.model import Policy

NOW = dt.datetime(2026, 11, 25, 12, tzinfo=dt.UTC)


def policy(**extra: object) -> Policy:
    doc: dict[str, object] = {
        "issuers": [
            {
                "name": "ci",
                "issuer": "https://ci.example",
                "audiences": ["b"],
                "jwks_uri": "https://ci.example/k",
            },
            {
                "name": "sso",
                "issuer": "https://sso.example",
                "audiences": ["a"],
                "kind": "people",
                "roles_claim": "groups",
                "jwks_uri": "https://sso.example/k",
            },
        ],
        "actions": {"fine-tune": {"tier": "elevated", "max_ttl": "1h", "approvals": 2}},
        "models": {"m": {}, "guarded": {"approvers": ["model-owners"]}},
        "people": {
            "alice": [
                {"issuer": "sso", "subject": "alice@x"},
                {"issuer": "ci", "claim": "actor", "value": "alice"},
            ]
        },
    }
    doc.update(extra)
    return Policy.model_validate(doc)


def person(
    subject: str, *roles: str, issuer: str = "sso", groups: frozenset[str] = frozenset()
) -> Person:
    return _seal_person(
        issuer_name=issuer,
        issuer="https://sso.example",
        subject=subject,
        roles=frozenset(roles),
        groups=groups,
        expires_at=0,
    )


def refusal(
    p: Person,
    *,
    model: str = "m",
    requester: tuple[str, str, dict[str, object]] = ("ci", "repo:x", {}),
    earlier: tuple[tuple[str, str], ...] = (),
) -> tuple[str, str] | None:
    return review_refusal(policy(), p, model=model, requester=requester, earlier_reviewers=earlier)


def test_an_approver_may_review() -> None:
    assert refusal(person("bob@x", "approver")) is None


def test_without_the_approver_role_refused() -> None:
    assert refusal(person("bob@x", "admin", "auditor")) == (
        "role",
        "bob@x needs role approver; has ['admin', 'auditor']",
    )


def test_per_model_approver_groups() -> None:
    kind, message = refusal(person("bob@x", "approver"), model="guarded") or ("", "")
    assert kind == "role" and "model-owners" in message
    assert (
        refusal(person("bob@x", "approver", groups=frozenset({"model-owners"})), model="guarded")
        is None
    )


def test_self_review_refused_same_issuer_and_subject() -> None:
    result = refusal(person("repo:x", "approver", issuer="ci"))
    assert result is not None and result[0] == "self"


def test_self_review_refused_through_a_mapped_second_identity() -> None:
    result = refusal(person("alice@x", "approver"), requester=("ci", "repo:x", {"actor": "alice"}))
    assert result is not None and result[0] == "self" and "alice" in result[1]
    # Another person's workload is fine for alice.
    assert (
        refusal(person("alice@x", "approver"), requester=("ci", "repo:x", {"actor": "carol"}))
        is None
    )


def test_each_reviewer_counts_once() -> None:
    result = refusal(person("bob@x", "approver"), earlier=(("sso", "bob@x"),))
    assert result is not None and result[0] == "twice"


def test_states_expire() -> None:
    later = NOW + dt.timedelta(hours=2)
    assert (
        effective_state("pending", now=NOW, expires_at=later, approved_until=None)
        is ApprovalState.PENDING
    )
    assert (
        effective_state("pending", now=later, expires_at=later, approved_until=None)
        is ApprovalState.EXPIRED
    )
    assert (
        effective_state("approved", now=later, expires_at=NOW, approved_until=later)
        is ApprovalState.EXPIRED
    )
    assert (
        effective_state("used", now=later, expires_at=NOW, approved_until=NOW) is ApprovalState.USED
    )
    assert (
        effective_state("denied", now=later, expires_at=NOW, approved_until=None)
        is ApprovalState.DENIED
    )


def test_bindings_differ_by_field() -> None:
    a = Binding(
        "ci", "s", {"sub": "s"}, "m", "fine-tune", "jwt", {"datasets": []}, None, "sha256:1"
    )
    b = Binding(
        "ci",
        "s",
        {"sub": "s"},
        "m",
        "fine-tune",
        "vault",
        {"datasets": [{"uri": "s3://d"}]},
        None,
        "sha256:1",
    )
    assert a.digest() != b.digest()
    assert differences(a.as_dict(), b.as_dict()) == ["backend", "lineage"]
    assert a.digest() == Binding(**{**a.__dict__}).digest()
