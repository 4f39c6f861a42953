"""The pure approval rules: separation of duties, states, bindings (the rollback gate:
tests/approvals/test_rollback.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from broker.approvals.rules import (
    ApprovalState,
    Binding,
    binding_changes,
    describe_changes,
    distinct_people,
    effective_state,
    persons_of,
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


def binding(**changed: object) -> Binding:
    fields: dict[str, object] = {
        "issuer": "ci",
        "subject": "s",
        "claims": {"sub": "s"},
        "model": "m",
        "action": "fine-tune",
        "backend": "jwt",
        "requested_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "audience": "model:m",
        "ttl_seconds": 3600,
        "lineage": {"datasets": []},
        "reason": None,
        "policy_digest": "sha256:1",
    }
    fields.update(changed)
    return Binding(**fields)  # type: ignore[arg-type]


def test_bindings_differ_by_field() -> None:
    a = binding()
    b = binding(backend="vault", lineage={"datasets": [{"uri": "s3://d"}]})
    assert a.digest() != b.digest()
    assert binding_changes(a.as_dict(), b.as_dict()) == [
        ("backend", "jwt", "vault"),
        ("lineage.datasets", [], [{"uri": "s3://d"}]),
    ]
    assert a.digest() == Binding(**{**a.__dict__}).digest()


@pytest.mark.parametrize(
    ("changed", "field"),
    [
        ({"audience": "deploy-svc"}, "audience"),
        ({"ttl_seconds": 600}, "ttl_seconds"),
        ({"requested_token_type": "urn:broker:token-type:vault-token"}, "requested_token_type"),
        ({"backend": "vault"}, "backend"),
        ({"reason": "another job"}, "reason"),
        ({"claims": {"sub": "s", "actor": "alice"}}, "claims.actor"),
        ({"policy_digest": "sha256:2"}, "policy_digest"),
    ],
)
def test_the_binding_covers_what_shapes_the_credential(
    changed: dict[str, object], field: str
) -> None:
    """Each field of the credential is in the digest: an approval for one is not one for the
    other, and the difference is named."""
    a, b = binding(), binding(**changed)
    assert a.digest() != b.digest()
    assert [change[0] for change in binding_changes(a.as_dict(), b.as_dict())] == [field]


def test_changes_are_described_with_both_sides_capped() -> None:
    changes = binding_changes(
        binding().as_dict(),
        binding(audience="deploy-svc", ttl_seconds=600, reason="x" * 5000).as_dict(),
    )
    text = describe_changes(changes)
    assert text.startswith(
        "audience: approved 'model:m', requested 'deploy-svc'; "
        "ttl_seconds: approved 3600, requested 600; reason: approved none, requested 'xxx"
    )
    assert "[5000 characters, sha256:" in text and len(text) < 1000
    many = [(f"f{i}", i, i + 1) for i in range(12)]
    assert describe_changes(many).endswith("f7: approved 7, requested 8 (and 4 more)")


# --- people -------------------------------------------------------------------------------------


def two_sso_policy() -> Policy:
    """The issue's case: alice has an identity at each of two people issuers."""
    sso2 = {
        "name": "sso2",
        "issuer": "https://sso2.example",
        "audiences": ["a"],
        "kind": "people",
        "roles_claim": "groups",
        "jwks_uri": "https://sso2.example/k",
    }
    base = policy()
    return policy(
        issuers=[*(i.model_dump(exclude_none=True) for i in base.issuers), sso2],
        people={
            "alice": [
                {"issuer": "sso", "subject": "alice@example.com"},
                {"issuer": "sso2", "subject": "alice"},
                {"issuer": "ci", "claim": "actor", "value": "alice"},
            ]
        },
    )


def test_people_entries_match_ignoring_case() -> None:
    p = two_sso_policy()
    assert persons_of(p, "sso", "Alice@Example.com", {}) == {"alice"}
    assert persons_of(p, "sso2", "ALICE", {}) == {"alice"}
    assert persons_of(p, "ci", "repo:x", {"actor": "Alice"}) == {"alice"}
    # Another issuer's "alice" is nobody in particular.
    assert persons_of(p, "ci", "alice", {}) == set()
    # A claim the token lacks matches no value (not even one spelt "None").
    assert persons_of(p, "ci", "repo:x", {}) == set()


def test_two_identities_of_one_person_count_once() -> None:
    p = two_sso_policy()
    assert distinct_people(p, [("sso", "alice@example.com"), ("sso2", "alice")]) == 1
    assert distinct_people(p, [("sso", "bob@example.com"), ("sso", "Bob@Example.com")]) == 1
    assert distinct_people(p, [("sso", "alice@example.com"), ("sso", "bob@example.com")]) == 2


def test_a_second_identity_of_a_reviewer_is_refused_as_twice() -> None:
    p = two_sso_policy()
    result = review_refusal(
        p,
        person("alice", "approver", issuer="sso2"),
        model="m",
        requester=("ci", "repo:x", {}),
        earlier_reviewers=[("sso", "alice@example.com")],
    )
    assert result == (
        "twice",
        "alice has already reviewed this request (as 'alice@example.com' of sso); each person "
        "counts once, whichever identity they use",
    )


def test_the_same_identity_in_another_case_is_refused_as_twice() -> None:
    result = refusal(person("Bob@X", "approver"), earlier=(("sso", "bob@x"),))
    assert result is not None and result[0] == "twice"


@pytest.mark.parametrize(
    ("reviewer", "claims"),
    [
        (person("alice@x", "approver"), {"actor": "Alice"}),  # the issue: actor Alice, value alice
        (person("ALICE@X", "approver"), {"actor": "alice"}),  # the subject in another case
    ],
)
def test_self_review_refused_ignoring_case(reviewer: Person, claims: dict[str, object]) -> None:
    result = refusal(reviewer, requester=("ci", "repo:x", claims))
    assert result is not None and result[0] == "self" and "alice" in result[1]
