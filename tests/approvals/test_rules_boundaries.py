"""The approval rules at their edges: what mutmut found untested in broker/approvals/rules.py
(docs/testing.md): separation of duties through a subject mapping, and the binding's canonical
form, which stored requests rely on. (The rollback gate's age limit at its edge is in
tests/approvals/test_rollback.py.)"""

from __future__ import annotations

import hashlib
import json

from broker.approvals.rules import Binding, binding_changes, review_refusal
from tests.approvals.test_rules import person, policy


def test_self_review_refused_through_a_subject_mapping() -> None:
    """A person mapped to the requesting workload by its subject (not by a claim)."""
    people = {
        "alice": [{"issuer": "sso", "subject": "alice@x"}, {"issuer": "ci", "subject": "repo:x"}]
    }
    result = review_refusal(
        policy(people=people),
        person("alice@x", "approver"),
        model="m",
        requester=("ci", "repo:x", {}),
        earlier_reviewers=[],
    )
    assert result == (
        "self",
        "the requester cannot review their own request (alice, through another identity)",
    )


def test_a_request_for_a_model_no_longer_in_the_policy_can_be_reviewed() -> None:
    """No per-model approver groups to check: the approver role is enough (and the exchange
    that would use the approval is refused for the unknown model anyway)."""
    reviewer = person("bob@x", "approver")
    found = review_refusal(
        policy(), reviewer, model="gone", requester=("ci", "repo:x", {}), earlier_reviewers=[]
    )
    assert found is None


def test_same_issuer_and_subject_message() -> None:
    found = review_refusal(
        policy(),
        person("repo:x", "approver", issuer="ci"),
        model="m",
        requester=("ci", "repo:x", {}),
        earlier_reviewers=[],
    )
    assert found == ("self", "the requester cannot review their own request")


BOUND = {
    "issuer": "ci",
    "subject": "repo:x",
    "claims": {"actor": "alice"},
    "model": "m",
    "action": "fine-tune",
    "backend": "jwt",
    "requested_token_type": "urn:ietf:params:oauth:token-type:jwt",
    "audience": "model:m",
    "ttl_seconds": 3600,
    "lineage": {"datasets": [{"uri": "s3://d/1"}]},
    "reason": "r",
    "policy_digest": "sha256:" + "0" * 64,
}


def test_binding_canonical_form() -> None:
    """The field names are what `bound` shows and what a refusal names as differing; the digest
    is sha256 over their canonical JSON, and is stored with every request."""
    binding = Binding(**BOUND)  # type: ignore[arg-type]
    assert binding.as_dict() == BOUND
    canonical = json.dumps(BOUND, sort_keys=True, separators=(",", ":")).encode()
    assert binding.digest() == "sha256:" + hashlib.sha256(canonical).hexdigest()
    other = Binding(**{**BOUND, "reason": "s", "model": "n"})  # type: ignore[arg-type]
    changes = binding_changes(binding.as_dict(), other.as_dict())
    assert [field for field, _, _ in changes] == ["model", "reason"]
