"""Revocation: the Deny statements the broker writes into the role's ``broker-revocations``
inline policy, read back from moto's IAM. (moto stores IAM policies but does not evaluate
them for STS sessions; that they stop the session is what only real AWS can show.)"""

from __future__ import annotations

import datetime as dt
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from broker.backends.aws import (
    ROLE_INLINE_POLICIES_MAX_CHARS,
    AwsBackend,
    RevocationMethod,
    RevocationPolicy,
    policy_chars,
)
from broker.errors import BackendUnavailable
from broker.grants.model import GrantStatus
from tests.backends.aws.conftest import (
    ROLE_ARN,
    ROLE_NAME,
    Moto,
    capturing_session,
    load,
    make_grant,
)

pytestmark = pytest.mark.integration  # moto over HTTP

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


def grant_at(n: int, *, issued: dt.datetime = NOW, ttl: int = 900) -> Any:
    return make_grant(
        id=f"g_{n:024x}", issued_at=issued, expires_at=issued + dt.timedelta(seconds=ttl)
    )


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def aws_at(moto: Moto, clock: Clock) -> AwsBackend:
    return AwsBackend(load(), session=capturing_session(moto), clock=clock)


def grant_ids_denied(document: dict[str, Any]) -> set[str]:
    ids: set[str] = set()
    for statement in document["Statement"]:
        ids |= set(
            statement["Condition"].get("StringEquals", {}).get("aws:PrincipalTag/grant_id", [])
        )
    return ids


def test_revoking_a_grant_denies_its_session_tag(aws_at: AwsBackend, moto: Moto) -> None:
    grant = grant_at(1)
    (outcome,) = aws_at.revoke_grants([grant])
    assert outcome.method is RevocationMethod.GRANT_TAG and not outcome.fallback
    document = moto.revocation_policy()
    until = int((NOW + dt.timedelta(minutes=30)).timestamp())  # expiry + 5 min, next 15 min
    assert document["Statement"] == [
        {
            "Sid": "BrokerRevokedIssuedBeforeUntil0",
            "Effect": "Deny",
            "Action": "*",
            "Resource": "*",
            "Condition": {"DateLessThan": {"aws:TokenIssueTime": "1970-01-01T00:00:00Z"}},
        },
        {
            "Sid": f"BrokerRevokedGrantsUntil{until}",
            "Effect": "Deny",
            "Action": "*",
            "Resource": "*",
            "Condition": {"StringEquals": {"aws:PrincipalTag/grant_id": [grant.id]}},
        },
    ]
    assert outcome.policy_chars == policy_chars(document)
    assert outcome.to_event()["grant_ids"] == [grant.id]


def test_revocation_is_idempotent_and_keeps_earlier_entries(aws_at: AwsBackend, moto: Moto) -> None:
    aws_at.revoke(grant_at(1), None)
    aws_at.revoke(grant_at(2), None)
    aws_at.revoke(grant_at(1), None)
    assert grant_ids_denied(moto.revocation_policy()) == {grant_at(1).id, grant_at(2).id}


def test_expired_grants_need_no_entry(aws_at: AwsBackend, moto: Moto) -> None:
    old = grant_at(1, issued=NOW - dt.timedelta(hours=2))
    (outcome,) = aws_at.revoke_grants([old])
    assert outcome.method is RevocationMethod.ALREADY_EXPIRED
    iam = moto.admin("iam")
    assert iam.list_role_policies(RoleName=ROLE_NAME)["PolicyNames"] == []


def test_a_grant_that_simply_expired_needs_no_entry(aws_at: AwsBackend, moto: Moto) -> None:
    """The expiry sweep queues every expired external grant; STS ends those sessions itself,
    and an entry for each would crowd the role's policy into cutoffs that revoke everyone."""
    expired = make_grant(id="g_expired", status=GrantStatus.EXPIRED, issued_at=NOW)
    (outcome,) = aws_at.revoke_grants([expired])
    assert outcome.method is RevocationMethod.ALREADY_EXPIRED
    assert aws_at.revoke(expired, None) is True
    assert moto.admin("iam").list_role_policies(RoleName=ROLE_NAME)["PolicyNames"] == []


def test_prune_drops_entries_once_their_sessions_expired(
    aws_at: AwsBackend, moto: Moto, clock: Clock
) -> None:
    aws_at.revoke_grants([grant_at(1, ttl=900), grant_at(2, ttl=3600)])
    aws_at.revoke_all_before("llama-7b", NOW - dt.timedelta(minutes=1))
    clock.now = NOW + dt.timedelta(minutes=31)
    assert aws_at.prune() == {ROLE_ARN: 1}
    assert grant_ids_denied(moto.revocation_policy()) == {grant_at(2).id}
    clock.now = NOW + dt.timedelta(hours=13)
    assert aws_at.prune() == {ROLE_ARN: 2}  # grant 2 and the cutoff
    assert moto.revocation_policy() == RevocationPolicy.empty().to_document()
    assert aws_at.prune() == {ROLE_ARN: 0}


def test_bulk_revocation_writes_an_issue_time_cutoff(aws_at: AwsBackend, moto: Moto) -> None:
    aws_at.revoke(grant_at(1), None)
    cutoff = NOW + dt.timedelta(seconds=30)
    outcome = aws_at.revoke_all_before("llama-7b", cutoff)
    assert outcome.method is RevocationMethod.ISSUE_TIME_CUTOFF and outcome.cutoff == cutoff
    statements = moto.revocation_policy()["Statement"]
    until = int((cutoff + dt.timedelta(hours=12)).timestamp())
    assert statements == [
        {
            "Sid": f"BrokerRevokedIssuedBeforeUntil{until}",
            "Effect": "Deny",
            "Action": "*",
            "Resource": "*",
            "Condition": {"DateLessThan": {"aws:TokenIssueTime": "2030-01-01T12:00:30Z"}},
        }
    ]  # the per-grant entry is covered by the cutoff, so it went
    earlier = aws_at.revoke_all_before("llama-7b", NOW)
    assert earlier.cutoff == cutoff  # a cutoff never moves back


def test_overflow_falls_back_to_a_cutoff_and_says_so(aws_at: AwsBackend, moto: Moto) -> None:
    # Another inline policy on the role shares IAM's 10,240-character budget.
    filler = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": f"Filler{i}", "Effect": "Deny", "Action": "s3:DeleteBucket", "Resource": "*"}
            for i in range(128)
        ],
    }
    moto.admin("iam").put_role_policy(
        RoleName=ROLE_NAME, PolicyName="other", PolicyDocument=json.dumps(filler)
    )
    budget = ROLE_INLINE_POLICIES_MAX_CHARS - policy_chars(filler)
    revoked = [grant_at(n) for n in range(40)]
    outcomes = [aws_at.revoke_grants([g])[0] for g in revoked]
    assert all(o.budget_chars == budget for o in outcomes)
    fallback = next(o for o in outcomes if o.fallback)
    assert fallback.method is RevocationMethod.ISSUE_TIME_CUTOFF
    assert fallback.cutoff == NOW + dt.timedelta(seconds=5)
    assert fallback.to_event()["fallback"] is True
    document = moto.revocation_policy()
    assert policy_chars(document) <= budget
    assert "2030-01-01T12:00:05Z" in json.dumps(document)
    assert all(o.policy_chars <= budget for o in outcomes)


def test_concurrent_revocations_lose_no_entry(aws_at: AwsBackend, moto: Moto) -> None:
    """IAM has no conditional write: without the role lock, concurrent read-modify-writes
    overwrite each other's entries."""
    revoked = [grant_at(n) for n in range(12)]
    start = threading.Barrier(len(revoked))

    def revoke(grant: Any) -> bool:
        start.wait()
        return aws_at.revoke(grant, grant.id)

    with ThreadPoolExecutor(max_workers=len(revoked)) as pool:
        assert all(pool.map(revoke, revoked))
    assert grant_ids_denied(moto.revocation_policy()) == {g.id for g in revoked}


def test_statements_the_broker_did_not_write_are_kept(aws_at: AwsBackend, moto: Moto) -> None:
    manual = {
        "Sid": "IncidentResponse",
        "Effect": "Deny",
        "Action": "s3:PutObject",
        "Resource": "*",
    }
    document = RevocationPolicy.empty().to_document()
    document["Statement"].append(manual)
    moto.admin("iam").put_role_policy(
        RoleName=ROLE_NAME, PolicyName="broker-revocations", PolicyDocument=json.dumps(document)
    )
    aws_at.revoke(grant_at(1), None)
    assert manual in moto.revocation_policy()["Statement"]


def test_missing_role_is_backend_unavailable(moto: Moto) -> None:
    moto.admin("iam").delete_role(RoleName=ROLE_NAME)
    aws = AwsBackend(load(), session=capturing_session(moto))
    with pytest.raises(
        BackendUnavailable, match="IAM GetRole on role model-llama-7b failed: NoSuchEntity"
    ):
        aws.revoke(make_grant(), None)


def test_revocation_policy_is_readable(aws_at: AwsBackend) -> None:
    aws_at.revoke(grant_at(7), None)
    assert aws_at.revocation_policy("llama-7b").revoked_grant_ids() == {grant_at(7).id}
