"""Leases in the store: one holder at a time, taken over once it lapses (the generation counts
up), a lost lease caught inside the transaction that would act on it, and locks that exclude
other processes. On SQLite with a clock of the test's own, and on PostgreSQL with its clock."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.store.db import Store, sqlite_url
from broker.store.lease import MAINTENANCE, Held, LeaseLost, Leases, LockTimeout
from tests.servers import Postgres, wait_until

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(sqlite_url(tmp_path))
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_one_holder_at_a_time_and_a_takeover_once_it_lapses(store: Store, clock: Clock) -> None:
    a, b = Leases(store, "a", clock=clock), Leases(store, "b", clock=clock)
    first = a.acquire(MAINTENANCE, 10)
    assert first == Held(MAINTENANCE, 1, NOW + dt.timedelta(seconds=10))
    assert b.acquire(MAINTENANCE, 10) is None
    clock.advance(9)
    renewed = a.acquire(MAINTENANCE, 10)
    assert renewed is not None and renewed.generation == 1  # renewal: the same generation
    clock.advance(9)
    assert b.acquire(MAINTENANCE, 10) is None  # renewed: still a's
    assert b.holder_of(MAINTENANCE) == ("a", 1)
    clock.advance(2)  # a stopped renewing: lapsed
    assert b.holder_of(MAINTENANCE) is None
    taken = b.acquire(MAINTENANCE, 10)
    assert taken is not None and taken.generation == 2
    assert a.acquire(MAINTENANCE, 10) is None
    assert a.holder_of(MAINTENANCE) == ("b", 2)


def test_a_lost_lease_is_caught_in_the_transaction_that_would_act_on_it(
    store: Store, clock: Clock
) -> None:
    a, b = Leases(store, "a", clock=clock), Leases(store, "b", clock=clock)
    held = a.acquire(MAINTENANCE, 10)
    assert held is not None
    with store.transaction() as conn:
        a.check(conn, held)  # still a's: no error
    clock.advance(11)
    with pytest.raises(LeaseLost), store.transaction() as conn:
        a.check(conn, held)  # lapsed, though nobody took it yet
    assert b.acquire(MAINTENANCE, 10) is not None
    clock.advance(20)
    again = a.acquire(MAINTENANCE, 10)  # b lapsed too; a takes it back, as a new generation
    assert again is not None and again.generation == 3
    with pytest.raises(LeaseLost), store.transaction() as conn:
        a.check(conn, held)  # the old generation stays stale


def test_a_released_lease_is_taken_at_once(store: Store, clock: Clock) -> None:
    a, b = Leases(store, "a", clock=clock), Leases(store, "b", clock=clock)
    assert a.acquire(MAINTENANCE, 10) is not None
    b.release(MAINTENANCE)  # not b's: nothing happens
    assert b.acquire(MAINTENANCE, 10) is None
    a.release(MAINTENANCE)
    assert b.acquire(MAINTENANCE, 10) is not None


def test_a_lock_excludes_other_processes_until_released(store: Store) -> None:
    other_store = Store(store.url)  # another process's engine on the same file
    try:
        mine, theirs = Leases(store, "mine"), Leases(other_store, "theirs")
        inside = threading.Event()
        leave = threading.Event()

        def hold() -> None:
            with mine.lock("aws-role:r", ttl_s=30, wait_s=5):
                inside.set()
                leave.wait(10)

        thread = threading.Thread(target=hold)
        thread.start()
        try:
            assert inside.wait(5)
            with pytest.raises(LockTimeout), theirs.lock("aws-role:r", ttl_s=30, wait_s=0.3):
                pass
            with theirs.lock("aws-role:other", ttl_s=30, wait_s=0.3):
                pass  # another name is another lock
        finally:
            leave.set()
            thread.join()
        with theirs.lock("aws-role:r", ttl_s=30, wait_s=1):
            pass  # released
    finally:
        other_store.close()


def test_a_lock_left_by_a_dead_process_lapses(store: Store, clock: Clock) -> None:
    dead, alive = Leases(store, "dead", clock=clock), Leases(store, "alive", clock=clock)
    assert dead.acquire("aws-role:r", 30) is not None  # held, never released: the holder died
    with pytest.raises(LockTimeout), alive.lock("aws-role:r", ttl_s=30, wait_s=0.2):
        pass
    clock.advance(31)
    with alive.lock("aws-role:r", ttl_s=30, wait_s=0.2):
        pass


@pytest.mark.parametrize("held_by", ["a dead process", "another thread of this one"])
def test_a_stopping_broker_waits_for_no_lock(store: Store, held_by: str) -> None:
    """Broker.close stops the waits (Leases.stop_waiting): a maintenance round waiting for a
    role's lock left by a dead worker kept the worker from stopping on SIGTERM."""
    waiting = Leases(store, "alive")
    release = threading.Event()
    if held_by == "a dead process":
        assert Leases(store, "dead").acquire("aws-role:r", 120) is not None  # never released
    else:
        inside = threading.Event()

        def hold() -> None:
            with waiting.lock("aws-role:r", ttl_s=30, wait_s=5):
                inside.set()
                release.wait(60)

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        assert inside.wait(5)
    outcome: list[BaseException | None] = []

    def wait_for_it() -> None:
        try:
            with waiting.lock("aws-role:r", ttl_s=30, wait_s=60):
                outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait_for_it, daemon=True)
    thread.start()
    try:
        thread.join(0.3)
        assert thread.is_alive()  # it waits, as it would for a minute
        waiting.stop_waiting()
        thread.join(5)
        assert not thread.is_alive(), "the wait went on after stop_waiting"
        [raised] = outcome
        assert isinstance(raised, LockTimeout)
        assert "the broker is stopping" in raised.description
    finally:
        release.set()


@pytest.mark.integration
def test_racing_replicas_on_postgresql_elect_one_holder(postgres: Postgres) -> None:
    with postgres.database() as url:
        stores = [Store(url) for _ in range(6)]
        try:
            stores[0].migrate()
            start = threading.Barrier(len(stores))
            won: list[Held | None] = [None] * len(stores)

            def race(i: int) -> None:
                leases = Leases(stores[i], f"replica-{i}")
                start.wait()
                won[i] = leases.acquire(MAINTENANCE, 30)

            threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [i for i, held in enumerate(won) if held is not None]
            assert len(winners) == 1, won
            holder = Leases(stores[0], "observer").holder_of(MAINTENANCE)
            assert holder == (f"replica-{winners[0]}", 1)
            # The database's clock decides expiry: a lease of a second lapses for everyone.
            winner = Leases(stores[winners[0]], f"replica-{winners[0]}")
            assert winner.acquire(MAINTENANCE, 0.001) is not None
            other = Leases(stores[winners[0] - 1], "late")
            assert wait_until(lambda: other.acquire(MAINTENANCE, 30) is not None)
            assert other.holder_of(MAINTENANCE) == ("late", 2)
        finally:
            for s in stores:
                s.close()
