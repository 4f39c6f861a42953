"""The approval rules at their edges: what mutmut found untested in broker/approvals/rules.py
(docs/testing.md). The rollback gate's two limits, exactly at and just past them; separation of
duties through a subject mapping; the binding's canonical form, which stored requests rely on."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest

from broker.approvals.rules import Binding, differences, review_refusal, rollback_gap
from tests.approvals.test_rules import NOW, lineage, person, policy

WEEK = 7 * 86400


@pytest.mark.parametrize(
    ("tested_at", "refused"),
    [
        (NOW + dt.timedelta(minutes=5), False),  # clock skew up to five minutes is tolerated
        (NOW + dt.timedelta(minutes=5, seconds=1), True),
        (NOW - dt.timedelta(seconds=WEEK), False),  # exactly rollback_test_max_age old
        (NOW - dt.timedelta(seconds=WEEK + 1), True),
    ],
)
def test_rollback_gate_limits(tested_at: dt.datetime, refused: bool) -> None:
    gap = rollback_gap(lineage(tested_at=tested_at.isoformat()), now=NOW, max_age=WEEK)
    assert (gap is not None) is refused, gap


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
    assert differences(binding.as_dict(), other.as_dict()) == ["model", "reason"]
