"""The backend revocation queue (broker/grants/revocation.py) on a real store, against a fake of
our own Backend protocol: confirm, retry with backoff, permanent failure, explained revocations,
stuck ``issuing`` grants, the reconciler and pruning. Every outcome is an audit event."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select

from broker.audit.log import rfc3339
from broker.backends.base import BackendRegistry
from broker.errors import AccessDenied, BackendUnavailable
from broker.grants.model import Grant, GrantStatus
from broker.grants.revocation import MAX_BACKOFF_S, backoff
from broker.runtime import Broker
from broker.store.tables import GrantRow, RevocationRow
from tests.backends.conformance import make_grant
from tests.grants.support import FakeBackend, events, store_grant


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock(broker: Broker) -> Clock:
    clock = Clock()
    broker.grants.clock = clock
    broker.grants.revocations.clock = clock
    return clock


@pytest.fixture
def fake(broker: Broker) -> FakeBackend:
    fake = FakeBackend()
    broker.grants.backends = BackendRegistry(
        {"jwt": broker.grants.backends.get("jwt"), "vault": fake}
    )
    return fake


def revoked_grant(broker: Broker, fake: FakeBackend, clock: Clock) -> Grant:
    """A vault grant the fake issued a credential for, revoked in the store and queued."""
    grant = make_grant(
        backend="vault", issued_at=clock(), expires_at=clock() + dt.timedelta(hours=1)
    )
    credential = fake.issue(grant)
    store_grant(broker, grant, status=GrantStatus.REVOKED, credential_ref=credential.credential_ref)
    with broker.store.write() as session:
        row = session.get(GrantRow, grant.id)
        assert row is not None
        broker.grants.revocations.enqueue(session, row, clock())
    return grant


def job(broker: Broker, grant_id: str) -> RevocationRow:
    with broker.store.read() as session:
        return session.scalars(
            select(RevocationRow).where(RevocationRow.grant_id == grant_id)
        ).one()


def outcomes(broker: Broker, grant_id: str) -> list[dict[str, Any]]:
    return [e for e in events(broker) if e["grant_id"] == grant_id]


def test_backoff_doubles_from_five_seconds_up_to_ten_minutes() -> None:
    assert [backoff(n) for n in range(0, 10)] == [5, 5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert backoff(60) == MAX_BACKOFF_S


def test_a_confirmed_revocation_is_recorded_once(
    broker: Broker, fake: FakeBackend, clock: Clock
) -> None:
    grant = revoked_grant(broker, fake, clock)
    assert broker.grants.get(grant.id).backend_revocation == "pending"

    assert broker.grants.revocations.process([grant.id]) == 1
    assert fake.revoked == [(grant.id, f"ref-{grant.id}")] and fake.live == {}
    assert broker.grants.get(grant.id).backend_revocation == "confirmed"
    assert (job(broker, grant.id).status, job(broker, grant.id).attempts) == ("confirmed", 1)
    [event] = outcomes(broker, grant.id)
    assert event["type"] == "grant.backend_revocation_confirmed"
    assert (event["backend"], event["credential_ref"], event["attempt"]) == (
        "vault",
        f"ref-{grant.id}",
        1,
    )
    # A confirmed job is done: nothing asks the backend again.
    clock.advance(3600)
    assert broker.grants.revocations.process() == 0
    assert broker.grants.revocations.process([grant.id]) == 0
    assert len(fake.revoked) == 1


def test_a_job_two_processes_attempt_at_once_is_recorded_once(
    broker: Broker, fake: FakeBackend, clock: Clock
) -> None:
    """The revoking replica and the lease holder's retry round can pick up one job together;
    the one that records second finds it no longer pending and records nothing."""
    grant = revoked_grant(broker, fake, clock)
    revoke = fake.revoke
    raced: list[int] = []

    def racing(g: Grant, ref: str | None) -> bool:
        # While this attempt talks to the backend, another one (not racing) runs whole.
        fake.revoke = revoke  # type: ignore[method-assign]
        raced.append(broker.grants.revocations.process([g.id]))
        return revoke(g, ref)

    fake.revoke = racing  # type: ignore[method-assign]
    assert broker.grants.revocations.process([grant.id]) == 0
    assert raced == [1]
    assert (job(broker, grant.id).status, job(broker, grant.id).attempts) == ("confirmed", 1)
    assert [e["type"] for e in outcomes(broker, grant.id)] == ["grant.backend_revocation_confirmed"]


def test_an_unreachable_backend_is_retried_with_backoff_until_it_confirms(
    broker: Broker, fake: FakeBackend, clock: Clock
) -> None:
    fake.outcomes = [BackendUnavailable("vault is down"), False, True]
    grant = revoked_grant(broker, fake, clock)
    revocations = broker.grants.revocations
    start = clock()

    assert revocations.process([grant.id]) == 0
    first = job(broker, grant.id)
    assert (first.status, first.attempts, first.last_error) == ("pending", 1, "vault is down")
    assert first.next_attempt_at == start + dt.timedelta(seconds=5)
    clock.advance(4)
    assert revocations.process() == 0 and len(fake.revoked) == 1  # not due yet

    clock.advance(1)
    assert revocations.process() == 0  # the backend answers but does not confirm
    second = job(broker, grant.id)
    assert (second.attempts, second.last_error) == (2, "the backend did not confirm")
    assert second.next_attempt_at == clock() + dt.timedelta(seconds=10)

    clock.advance(10)
    assert revocations.process() == 1
    assert broker.grants.get(grant.id).backend_revocation == "confirmed"
    kinds = [(e["type"], e["attempt"], e.get("retry_at")) for e in outcomes(broker, grant.id)]
    assert kinds == [
        (
            "grant.backend_revocation_failed",
            1,
            rfc3339(start + dt.timedelta(seconds=5)),
        ),
        (
            "grant.backend_revocation_failed",
            2,
            rfc3339(start + dt.timedelta(seconds=15)),
        ),
        ("grant.backend_revocation_confirmed", 3, None),
    ]


def test_a_refusal_that_retrying_cannot_fix_fails_the_job_for_good(
    broker: Broker, fake: FakeBackend, clock: Clock
) -> None:
    fake.outcomes = [AccessDenied("the accessor belongs to another grant")]
    grant = revoked_grant(broker, fake, clock)
    assert broker.grants.revocations.process([grant.id]) == 0
    assert job(broker, grant.id).status == "failed"
    assert broker.grants.get(grant.id).backend_revocation == "failed"
    [event] = outcomes(broker, grant.id)
    assert event["type"] == "grant.backend_revocation_failed" and event["permanent"] is True
    assert "retry_at" not in event
    clock.advance(MAX_BACKOFF_S * 10)
    assert broker.grants.revocations.process() == 0 and len(fake.revoked) == 1


@dataclass
class ExplainingBackend(FakeBackend):
    """A backend that says what its revocation did, like aws's fallback to a role cutoff."""

    def revoke_explained(
        self, grant: Grant, credential_ref: str | None
    ) -> tuple[bool, dict[str, Any]]:
        self.revoked.append((grant.id, credential_ref))
        return True, {"fallback": True, "cutoff": "2030-01-01T00:00:00Z"}


def test_an_explained_revocation_records_what_the_backend_did(broker: Broker, clock: Clock) -> None:
    fake = ExplainingBackend()
    broker.grants.backends = BackendRegistry({"vault": fake})
    grant = revoked_grant(broker, fake, clock)
    assert broker.grants.revocations.process([grant.id]) == 1
    confirmed, cutoff = outcomes(broker, grant.id)
    assert confirmed["type"] == "grant.backend_revocation_confirmed"
    assert confirmed["details"] == {"fallback": True, "cutoff": "2030-01-01T00:00:00Z"}
    assert cutoff["type"] == "backend.revocation_cutoff" and cutoff["fallback"] is True


def test_grants_stuck_issuing_are_failed_and_their_credentials_revoked(
    broker: Broker, fake: FakeBackend, clock: Clock
) -> None:
    old = make_grant(backend="vault", issued_at=clock() - dt.timedelta(minutes=5))
    recent = make_grant(backend="vault", issued_at=clock())
    for grant in (old, recent):
        store_grant(broker, grant, status=GrantStatus.ISSUING)
        fake.issue(grant)  # the backend issued; the broker died before the commit

    assert broker.grants.revocations.settle_stuck(older_than_s=60) == 1
    assert broker.grants.get(old.id).status is GrantStatus.FAILED
    assert broker.grants.get(recent.id).status is GrantStatus.ISSUING  # may still be committing
    assert [e["type"] for e in outcomes(broker, old.id)] == ["grant.failed"]
    assert outcomes(broker, old.id)[0]["stuck"] is True

    assert broker.grants.revocations.process() == 1
    assert fake.revoked == [(old.id, None)]  # no ref was recorded: revoke by grant id
    assert list(fake.live) == [recent.id]


def test_the_reconciler_revokes_what_no_active_grant_owns(
    broker: Broker, fake: FakeBackend, clock: Clock
) -> None:
    internal = FakeBackend(name="aws", external=False)
    broker.grants.backends = BackendRegistry({"vault": fake, "aws": internal})
    active = make_grant(
        backend="vault", issued_at=clock(), expires_at=clock() + dt.timedelta(hours=1)
    )
    revoked = make_grant(
        backend="vault", issued_at=clock(), expires_at=clock() + dt.timedelta(hours=1)
    )
    expired = make_grant(
        backend="vault",
        issued_at=clock() - dt.timedelta(hours=2),
        expires_at=clock() - dt.timedelta(hours=1),
    )
    store_grant(broker, active)
    store_grant(broker, revoked, status=GrantStatus.REVOKED)
    store_grant(broker, expired)  # still "active" in its row, past its expiry
    for grant in (active, revoked, expired):
        fake.issue(grant)
    fake.live["g_unknown"] = "ref-unknown"
    internal.live["g_unknown"] = "ref-internal"

    removed = broker.grants.revocations.reconcile(min_age_s=0)
    assert {(r["grant_id"], r["grant_status"]) for r in removed} == {
        (revoked.id, "revoked"),
        (expired.id, "expired"),
        ("g_unknown", None),
    }
    assert all(r["backend"] == "vault" and r["confirmed"] is True for r in removed)
    assert list(fake.live) == [active.id]
    assert internal.live == {"g_unknown": "ref-internal"}  # not external: not reconciled
    logged = {e["grant_id"] for e in events(broker, "reconcile.revoked")}
    assert logged == {revoked.id, expired.id, "g_unknown"}


def test_pruning_goes_on_past_a_backend_that_fails(broker: Broker) -> None:
    pruned: list[str] = []

    @dataclass
    class Pruning(FakeBackend):
        fails: bool = False

        def prune(self) -> None:
            pruned.append(self.name)
            if self.fails:
                raise BackendUnavailable(f"{self.name} is down")

    broker.grants.backends = BackendRegistry(
        {"aws": Pruning(name="aws", fails=True), "vault": Pruning(name="vault")}
    )
    broker.grants.revocations.prune()
    assert pruned == ["aws", "vault"]


def test_every_revocation_attempt_is_timed_with_its_failure(broker: Broker, clock: Clock) -> None:
    seen: list[tuple[str, str, bool]] = []
    fake = FakeBackend(outcomes=[BackendUnavailable("vault is down"), False, True])
    broker.grants.backends = BackendRegistry(
        {"jwt": broker.grants.backends.get("jwt"), "vault": fake},
        observe=lambda backend, operation, _s, failed: seen.append((backend, operation, failed)),
    )
    grant = revoked_grant(broker, fake, clock)
    for wait in (0, 5, 10):
        clock.advance(wait)
        broker.grants.revocations.process()
    failed = [failed for _, operation, failed in seen if operation == "revoke"]
    assert failed == [True, True, False]  # raised, did not confirm, confirmed
    assert {backend for backend, _, _ in seen} == {"vault"}
    assert broker.grants.get(grant.id).backend_revocation == "confirmed"
    fake.live["g_orphan"] = "ref-orphan"  # issued for no grant: the reconciler revokes it
    broker.grants.revocations.reconcile(min_age_s=0)
    assert seen[-1] == ("vault", "revoke", False)
