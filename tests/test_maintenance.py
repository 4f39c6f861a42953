"""Maintenance across processes sharing a store: the singleton jobs run only on the holder of
the maintenance lease, move to another process once it lapses (or is released), and a process
that is not the holder still keeps its own anchor up with the checkpoints signed elsewhere.

Two brokers on one data dir stand for two workers of ``broker serve --workers 2``; the
separate-process forms (kill -9 included) are in tests/integration/test_replicas.py."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select, update

from broker.audit.log import AuditLog
from broker.maintenance import STUCK_ROUND_TTLS
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from broker.store.lease import MAINTENANCE
from broker.store.tables import CheckpointRow, LeaseRow, UsedTokenRow

LEASE_TTL_S = 30.0


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Broker, Broker]]:
    def one() -> Broker:
        settings = Settings(
            dev=True, data_dir=tmp_path / "data", policy=EXAMPLE_POLICY, lease_ttl=LEASE_TTL_S
        )
        return build_broker(settings)

    first = one()
    second = one()
    try:
        yield first, second
    finally:
        second.close()
        first.close()


def checkpoints(broker: Broker) -> list[int]:
    with broker.store.read() as session:
        return list(session.scalars(select(CheckpointRow.size).order_by(CheckpointRow.size)))


def log_size(broker: Broker) -> int:
    with broker.store.read() as session:
        return AuditLog.size(session)


def grow(broker: Broker) -> None:
    with broker.store.write() as session:
        broker.audit.append(session, "test.event", dt.datetime.now(dt.UTC), {})


def spent_tokens(broker: Broker) -> int:
    with broker.store.read() as session:
        return int(session.execute(select(func.count()).select_from(UsedTokenRow)).scalar_one())


def spend_expired_token(broker: Broker, jti: str) -> None:
    with broker.store.write() as session:
        long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
        session.execute(insert(UsedTokenRow).values(issuer="i", jti=jti, expires_at=long_ago))


def test_only_the_lease_holder_runs_the_singletons(pair: tuple[Broker, Broker]) -> None:
    a, b = pair
    a.maintain()
    assert a.maintenance.held is not None
    assert checkpoints(a) == [log_size(a)]
    grow(b)
    spend_expired_token(b, "old")
    b.maintain()  # not the holder: no checkpoint, no purge
    assert b.maintenance.held is None
    assert checkpoints(b) == [log_size(b) - 1]
    assert spent_tokens(b) == 1
    a.maintain()
    assert checkpoints(a)[-1] == log_size(a)
    assert spent_tokens(a) == 0


def test_the_singletons_move_once_the_holder_stops_renewing(pair: tuple[Broker, Broker]) -> None:
    a, b = pair
    a.maintain()
    first = a.maintenance.held
    assert first is not None
    grow(a)  # a "dies" now: it never renews again, and LEASE_TTL_S later its lease has lapsed
    with a.store.write() as session:
        session.execute(update(LeaseRow).values(expires_at=dt.datetime.now(dt.UTC)))
    assert b.leases.holder_of(MAINTENANCE) is None
    b.maintain()
    taken = b.maintenance.held
    assert taken is not None and taken.generation == first.generation + 1
    assert checkpoints(b)[-1] == log_size(b)  # b signs now, with the one log key
    grow(b)
    a.maintain()  # a comes back: another holds the lease, so a does nothing of the singletons
    assert a.maintenance.held is None
    assert checkpoints(a)[-1] == log_size(a) - 1


def test_a_process_that_does_not_sign_follows_the_checkpoints_in_its_anchor(
    pair: tuple[Broker, Broker], tmp_path: Path
) -> None:
    a, _ = pair
    # A replica with a data dir (and so an anchor) of its own, on a's database and KEK.
    settings = Settings(
        dev=True,
        data_dir=tmp_path / "own",
        policy=EXAMPLE_POLICY,
        database_url=a.store.url,
        kek_file=tmp_path / "data" / "kek",
        lease_ttl=LEASE_TTL_S,
    )
    replica = build_broker(settings)
    try:
        assert replica.audit.anchor is not None and replica.audit.anchor.load() is None
        grow(a)
        a.maintain()
        replica.maintain()
        assert replica.maintenance.held is None
        anchored = replica.audit.anchor.load()
        assert anchored is not None and anchored.size == checkpoints(a)[-1]
        assert not replica.audit.integrity.problems()
    finally:
        replica.close()


def test_a_graceful_stop_hands_the_lease_over_at_once(pair: tuple[Broker, Broker]) -> None:
    a, b = pair
    a.maintain()
    assert a.maintenance.held is not None
    a.maintenance.close()  # what Broker.close does first
    b.maintain()
    assert b.maintenance.held is not None


def test_a_round_stuck_for_too_long_gives_the_lease_up(pair: tuple[Broker, Broker]) -> None:
    """A backend call that hangs must not keep the singletons on this process: its heartbeat
    releases the lease instead of renewing it, and the round's next step finds it gone."""
    a, b = pair
    a.maintain()
    assert a.maintenance.held is not None
    assert not a.maintenance._stuck(LEASE_TTL_S)  # no round under way
    a.maintenance._round_started = time.monotonic() - STUCK_ROUND_TTLS * LEASE_TTL_S
    assert a.maintenance._stuck(LEASE_TTL_S)
    assert a.maintenance.held is None
    b.maintain()
    assert b.maintenance.held is not None
