"""GrantService on a dev broker: the exchange (allowed, denied, replayed, external backends),
the reads and their filters, revocation, expiry and the lineage view. Assertions are on what
callers see: results and errors, the stored grants, and the audit log."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from sqlalchemy import func, select

from broker.backends.base import TOKEN_TYPE_JWT, TOKEN_TYPE_VAULT, BackendRegistry
from broker.errors import (
    AccessDenied,
    ApprovalRequired,
    BackendUnavailable,
    Conflict,
    InvalidRequest,
    InvalidTarget,
    NotFound,
    TokenReplayed,
)
from broker.grants.model import Grant, GrantStatus
from broker.grants.service import ExchangeRequest, ExchangeResult
from broker.identity.verifier import LEEWAY_SECONDS
from broker.runtime import Broker
from broker.store.tables import UsedTokenRow
from tests.backends.conformance import make_grant
from tests.conftest import EVAL_SUB, eval_token
from tests.grants.support import FakeBackend, admin, events, store_grant

TRAINER = "system:serviceaccount:training:trainer"


def request(token: str, **fields: Any) -> ExchangeRequest:
    values: dict[str, Any] = {
        "model": "llama-7b",
        "action": "evaluate",
        "token_type": TOKEN_TYPE_JWT,
    }
    return ExchangeRequest(subject_token=token, **{**values, **fields})


def exchange(broker: Broker, token: str | None = None, **fields: Any) -> ExchangeResult:
    return broker.grants.exchange(request(token or eval_token(broker), **fields))


def grant_count(broker: Broker) -> int:
    return len(broker.grants.find(limit=1000))


@pytest.fixture
def fake(broker: Broker) -> FakeBackend:
    """A fake external backend of our own protocol in the place of vault."""
    fake = FakeBackend()
    broker.grants.backends = BackendRegistry(
        {"jwt": broker.grants.backends.get("jwt"), "vault": fake}
    )
    return fake


def later(broker: Broker, seconds: float) -> None:
    """Set the grant service's (and its revocations') clock ``seconds`` ahead of now."""
    now = dt.datetime.now(dt.UTC)
    moved = lambda: now + dt.timedelta(seconds=seconds)  # noqa: E731
    broker.grants.clock = moved
    broker.grants.revocations.clock = moved


# --- exchange ------------------------------------------------------------------------------------


def test_an_allowed_exchange_commits_its_grant_and_event(broker: Broker) -> None:
    token = eval_token(broker)
    result = exchange(broker, token, reason="  nightly run  ")
    grant = result.grant
    assert (grant.model, grant.action, grant.tier, grant.backend) == (
        "llama-7b",
        "evaluate",
        "low",
        "jwt",
    )
    assert (grant.rule, grant.subject, grant.issuer) == ("dev-nightly-eval", EVAL_SUB, "dev")
    assert grant.policy_digest == broker.policy.digest and grant.audience == "model:llama-7b"
    assert grant.reason == "nightly run"
    assert grant.expires_at - grant.issued_at == dt.timedelta(hours=1)  # evaluate's max_ttl
    assert result.credential.credential_ref == grant.id
    assert broker.grants.get(grant.id).status is GrantStatus.ACTIVE

    [event] = events(broker, "exchange.allowed")
    assert event["grant_id"] == grant.id and event["credential_ref"] == grant.id
    assert event["identity"]["subject"] == EVAL_SUB and event["rule"] == "dev-nightly-eval"
    assert event["token_hmac"] == broker.audit.token_hmac(token)
    assert token not in json.dumps(events(broker))


def test_a_requested_ttl_shortens_the_grant(broker: Broker) -> None:
    grant = exchange(broker, requested_ttl=120).grant
    assert grant.expires_at - grant.issued_at == dt.timedelta(seconds=120)


def test_a_denied_exchange_is_recorded_and_spends_the_token(broker: Broker) -> None:
    token = eval_token(broker)
    with pytest.raises(AccessDenied, match="no rule allows subject") as denied:
        exchange(broker, token, model="mistral-7b")
    assert denied.value.disclosed["reasons"]
    [event] = events(broker, "exchange.denied")
    assert denied.value.fields["audit_index"] == event["idx"]
    assert (event["error"], event["model"], event["action"]) == (
        "access_denied",
        "mistral-7b",
        "evaluate",
    )
    assert event["identity"]["subject"] == EVAL_SUB
    assert event["token_hmac"] == broker.audit.token_hmac(token)
    assert grant_count(broker) == 0
    # A single-use token is spent by its first verified attempt, whatever the decision.
    with pytest.raises(TokenReplayed):
        exchange(broker, token)
    assert grant_count(broker) == 0


def test_a_single_use_token_is_exchanged_once(broker: Broker) -> None:
    token = eval_token(broker)
    exchange(broker, token)
    with pytest.raises(TokenReplayed, match="already exchanged"):
        exchange(broker, token)
    assert grant_count(broker) == 1
    assert events(broker)[-1]["type"] == "exchange.denied"
    assert "replayed" in events(broker)[-1]["description"]


def test_an_action_that_needs_approval_opens_a_request_and_issues_nothing(broker: Broker) -> None:
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(sub=TRAINER, claims={"kubernetes.io": {"namespace": "training"}})
    lineage = json.dumps({"datasets": ["s3://datasets/approved/a"]})
    with pytest.raises(ApprovalRequired) as required:
        exchange(broker, token, action="fine-tune", lineage=lineage)
    approval = broker.approvals.get(str(required.value.fields["approval_id"]))
    assert approval["status"] == "pending" and approval["bound"]["lineage"]["datasets"]
    assert grant_count(broker) == 0


def test_audiences_outside_the_policy_are_refused(broker: Broker, fake: FakeBackend) -> None:
    assert exchange(broker, audience="model:llama-7b").grant.audience == "model:llama-7b"
    with pytest.raises(InvalidTarget, match="'vault-prod' is not allowed for model llama-7b"):
        exchange(broker, audience="vault-prod")
    with pytest.raises(InvalidRequest, match="only to broker JWTs"):
        exchange(broker, audience="vault-prod", token_type=TOKEN_TYPE_VAULT)
    assert fake.live == {}


def test_an_overlong_reason_is_refused(broker: Broker) -> None:
    with pytest.raises(InvalidRequest, match="reason is longer than"):
        exchange(broker, reason="x" * 1001)
    assert exchange(broker, reason="   ").grant.reason is None


def test_an_external_backend_is_asked_between_issuing_and_active(
    broker: Broker, fake: FakeBackend
) -> None:
    seen: list[GrantStatus] = []
    issue = fake.issue

    def issue_and_look(grant: Grant) -> Any:
        seen.append(broker.grants.get(grant.id).status)
        return issue(grant)

    fake.issue = issue_and_look  # type: ignore[method-assign]
    result = exchange(broker, token_type=TOKEN_TYPE_VAULT)
    assert seen == [GrantStatus.ISSUING]
    assert broker.grants.get(result.grant.id).status is GrantStatus.ACTIVE
    assert fake.live == {result.grant.id: result.credential.credential_ref}
    [event] = events(broker, "exchange.allowed")
    assert event["credential_ref"] == result.credential.credential_ref


def test_an_external_backend_that_fails_leaves_a_failed_grant(
    broker: Broker, fake: FakeBackend
) -> None:
    def down(grant: Grant) -> Any:
        raise BackendUnavailable("vault is unreachable")

    fake.issue = down  # type: ignore[method-assign]
    token = eval_token(broker)
    with pytest.raises(BackendUnavailable):
        exchange(broker, token, token_type=TOKEN_TYPE_VAULT)
    [grant] = broker.grants.find(limit=10)
    assert grant.status is GrantStatus.FAILED
    assert events(broker, "exchange.denied")[-1]["error"] == "temporarily_unavailable"
    with pytest.raises(TokenReplayed):  # spent by the issuing row
        exchange(broker, token, token_type=TOKEN_TYPE_VAULT)


# --- reads ---------------------------------------------------------------------------------------


def stored(broker: Broker, **fields: Any) -> Grant:
    """A grant in the store; ``age`` (seconds before now) sets issued_at, ``ttl`` its length."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    issued_at = now - dt.timedelta(seconds=fields.pop("age", 0))
    expires_at = issued_at + dt.timedelta(seconds=fields.pop("ttl", 900))
    status = fields.pop("status", GrantStatus.ACTIVE)
    grant = make_grant(issued_at=issued_at, expires_at=expires_at, **fields)
    return store_grant(broker, grant, status=status)


def test_get_reads_one_grant(broker: Broker) -> None:
    grant = stored(broker, reason="why", lineage={"datasets": [{"uri": "s3://d/a"}]})
    assert broker.grants.get(grant.id) == grant
    with pytest.raises(NotFound, match="'g_missing' not found"):
        broker.grants.get("g_missing")


def test_find_filters_by_model_subject_and_status_newest_first(broker: Broker) -> None:
    oldest = stored(broker, age=300, model="llama-7b", subject="a")
    middle = stored(broker, age=200, model="mistral-7b", subject="a")
    newest = stored(broker, age=100, model="llama-7b", subject="b")
    expired = stored(broker, age=2000, ttl=60, subject="b")
    revoked = stored(broker, age=400, status=GrantStatus.REVOKED, model="mistral-7b")
    ids = lambda grants: [g.id for g in grants]  # noqa: E731
    find = broker.grants.find

    assert ids(find()) == [newest.id, middle.id, oldest.id, revoked.id, expired.id]
    assert ids(find(model="llama-7b")) == [newest.id, oldest.id, expired.id]
    assert ids(find(subject="a")) == [middle.id, oldest.id]
    assert ids(find(status="active")) == [newest.id, middle.id, oldest.id]
    assert ids(find(status="expired")) == [expired.id]
    assert ids(find(status="revoked")) == [revoked.id]
    assert ids(find(model="llama-7b", subject="b", status="active")) == [newest.id]
    assert ids(find(limit=2)) == [newest.id, middle.id]
    assert ids(find(limit=0)) == [newest.id]  # at least one
    assert find(status="expired")[0].status is GrantStatus.EXPIRED
    with pytest.raises(InvalidRequest, match="expected one of active, expired, revoked"):
        find(status="issuing")


def test_is_active_answers_only_for_active_unexpired_grants(broker: Broker) -> None:
    active = stored(broker)
    assert broker.grants.is_active(active.id) is not None
    for status in (GrantStatus.REVOKED, GrantStatus.ISSUING, GrantStatus.FAILED):
        assert broker.grants.is_active(stored(broker, status=status).id) is None
    assert broker.grants.is_active(stored(broker, age=120, ttl=60).id) is None
    assert broker.grants.is_active("g_missing") is None


def test_lineage_lists_model_altering_grants_of_one_model(broker: Broker) -> None:
    first = stored(broker, age=300, action="fine-tune", tier="elevated")
    stored(broker, age=200, action="evaluate", tier="low")
    stored(broker, age=150, model="mistral-7b", action="fine-tune", tier="elevated")
    second = stored(broker, age=100, action="deploy-weights", tier="privileged")
    history = broker.grants.lineage("llama-7b")
    assert [h["id"] for h in history] == [second.id, first.id]
    assert all(h["reviews"] == [] for h in history)  # no approval ids on these
    assert [h["id"] for h in broker.grants.lineage("llama-7b", limit=1)] == [second.id]


# --- revocation and expiry -----------------------------------------------------------------------


def test_revoke_marks_records_and_tells_the_backend(broker: Broker, fake: FakeBackend) -> None:
    result = exchange(broker, token_type=TOKEN_TYPE_VAULT)
    grant = broker.grants.revoke(result.grant.id, admin(broker), "  leaked  ")
    assert grant.status is GrantStatus.REVOKED and grant.backend_revocation == "confirmed"
    assert (grant.revoked_by, grant.revoke_reason) == ("dev-people:root@example.com", "leaked")
    assert fake.live == {}
    [event] = events(broker, "grant.revoked")
    assert event["grant_id"] == grant.id and event["actor"]["subject"] == "root@example.com"
    with pytest.raises(Conflict, match="is already revoked"):
        broker.grants.revoke(grant.id, admin(broker), "again")
    with pytest.raises(Conflict, match="is already expired"):
        broker.grants.revoke(stored(broker, age=120, ttl=60).id, admin(broker), "late")
    with pytest.raises(NotFound):
        broker.grants.revoke("g_missing", admin(broker), "x")
    assert len(events(broker, "grant.revoked")) == 1


def test_revoke_matching_takes_exactly_one_filter_and_only_active_grants(broker: Broker) -> None:
    person = admin(broker)
    llama = [stored(broker, subject="a"), stored(broker, subject="b")]
    stored(broker, subject="a", age=120, ttl=60)  # expired: left alone
    mistral = stored(broker, model="mistral-7b", subject="a")
    for filters in ({}, {"model": "llama-7b", "subject": "a"}):
        with pytest.raises(InvalidRequest, match="exactly one of model, subject and issuer"):
            broker.grants.revoke_matching(actor=person, reason="x", **filters)

    revoked = broker.grants.revoke_matching(actor=person, reason="incident", model="llama-7b")
    assert sorted(revoked) == sorted(g.id for g in llama)
    assert broker.grants.is_active(mistral.id) is not None
    assert broker.grants.revoke_matching(actor=person, reason="x", subject="a") == [mistral.id]
    assert broker.grants.revoke_matching(actor=person, reason="x", issuer="cluster") == []
    assert {e["grant_id"] for e in events(broker, "grant.revoked")} == {*revoked, mistral.id}


def test_expire_due_records_expiry_and_revokes_at_external_backends(
    broker: Broker, fake: FakeBackend
) -> None:
    internal = exchange(broker).grant
    external = exchange(broker, token_type=TOKEN_TYPE_VAULT).grant
    assert broker.grants.expire_due() == 0
    later(broker, 2 * 3600)
    assert broker.grants.expire_due() == 2
    assert broker.grants.expire_due() == 0  # once
    assert {e["grant_id"] for e in events(broker, "grant.expired")} == {internal.id, external.id}
    assert broker.grants.get(internal.id).backend_revocation is None  # a JWT just expires
    assert broker.grants.get(external.id).backend_revocation == "pending"
    assert broker.grants.revocations.process() == 1
    assert fake.live == {}


def test_spent_tokens_are_forgotten_once_they_could_not_verify_anyway(broker: Broker) -> None:
    exchange(broker)

    def spent() -> int:
        with broker.store.read() as session:
            return int(session.scalar(select(func.count()).select_from(UsedTokenRow)) or 0)

    assert spent() == 1
    assert broker.grants.purge_spent_tokens() == 0
    later(broker, 600 + LEEWAY_SECONDS)  # the dev token's ttl: still within the leeway
    assert broker.grants.purge_spent_tokens() == 0
    later(broker, 600 + 2 * LEEWAY_SECONDS + 5)
    assert broker.grants.purge_spent_tokens() == 1 and spent() == 0
