"""The keys table: keys created once however many replicas start at once, rotations that
serialise, fail closed on a key that does not open, and a KEK rotation in one transaction."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy import select, update

from broker.backends.keys import KeyRing, SigningKey, new_private
from broker.errors import ConfigError
from broker.keys.store import (
    ACTIVE,
    AUDIT_HMAC,
    CURRENT,
    DEV_ISSUER,
    JWT,
    NEXT,
    PREVIOUS,
    KeyStore,
    NewKey,
)
from broker.store.db import Store, sqlite_url
from broker.store.tables import KeyRingRow, KeyRow
from tests.keys.support import fresh_kek, key_store

T = TypeVar("T")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(sqlite_url(tmp_path))
    s.migrate()
    yield s
    s.close()


def rows(store: Store) -> list[tuple[str, str, str, bytes]]:
    with store.read() as s:
        return [
            (r.purpose, r.kid, r.slot, r.sealed)
            for r in s.scalars(select(KeyRow).order_by(KeyRow.purpose, KeyRow.slot))
        ]


def at_once(n: int, work: Callable[[int], T]) -> list[T]:
    """``work(i)`` in ``n`` threads released together; their results (errors re-raised)."""
    barrier = threading.Barrier(n)
    results: list[T | BaseException | None] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # re-raised below, in the test's thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def secret_key(secret: bytes) -> Callable[[], list[NewKey]]:
    return lambda: [NewKey(secret.hex()[:16], ACTIVE, secret)]


def test_ensure_stores_a_key_once_and_then_finds_it(store: Store) -> None:
    keys = key_store(store)
    first, created = keys.ensure(AUDIT_HMAC, secret_key(b"a" * 32))
    again, created_again = keys.ensure(AUDIT_HMAC, secret_key(b"b" * 32))
    assert created and not created_again
    assert [k.secret for k in again] == [k.secret for k in first] == [b"a" * 32]
    assert keys.generation(AUDIT_HMAC) == 1
    ((purpose, _, slot, sealed),) = rows(store)
    assert (purpose, slot) == (AUDIT_HMAC, ACTIVE) and b"a" * 32 not in sealed


def test_a_key_that_does_not_open_is_a_config_error_and_is_never_replaced(store: Store) -> None:
    keys = key_store(store)
    KeyRing(keys)
    before = rows(store)
    other = KeyStore(store, fresh_kek("/etc/broker/other-kek"))
    with pytest.raises(ConfigError) as raised:
        KeyRing(other)
    assert "does not open with the KEK /etc/broker/other-kek" in str(raised.value)
    assert "no key was replaced" in str(raised.value)
    assert rows(store) == before


def test_a_sealed_key_moved_to_another_row_does_not_open(store: Store) -> None:
    keys = key_store(store)
    keys.ensure(AUDIT_HMAC, secret_key(b"h" * 32))
    keys.ensure(DEV_ISSUER, lambda: [SigningKey.of(new_private()).stored(ACTIVE)])
    with store.write() as s:
        hmac_blob = s.scalars(select(KeyRow.sealed).where(KeyRow.purpose == AUDIT_HMAC)).one()
        s.execute(update(KeyRow).where(KeyRow.purpose == DEV_ISSUER).values(sealed=hmac_blob))
    with pytest.raises(ConfigError, match=r"the dev-issuer key .* does not open"):
        keys.load(DEV_ISSUER)


def test_rotations_move_every_slot_and_count_generations(store: Store) -> None:
    keys = key_store(store)
    ring = KeyRing(keys)
    first_current, first_next = ring.current.kid, ring.next.kid
    new = KeyRing.new_key()
    with store.transaction() as conn:
        rotation = keys.rotate_jwt(conn, new.stored(NEXT))
    assert (rotation.kid, rotation.next_kid, rotation.retired_kid) == (first_next, new.kid, None)
    slots = {slot: kid for purpose, kid, slot, _ in rows(store) if purpose == JWT}
    assert slots == {PREVIOUS: first_current, CURRENT: first_next, NEXT: new.kid}
    with store.transaction() as conn:
        second = keys.rotate_jwt(conn, KeyRing.new_key().stored(NEXT))
    assert second.retired_kid == first_current
    assert len([r for r in rows(store) if r[0] == JWT]) == 3
    assert keys.generation(JWT) == 3  # created, rotated, rotated


def test_reseal_moves_every_key_to_the_new_kek_at_once(store: Store) -> None:
    keys = key_store(store)
    ring = KeyRing(keys)
    keys.ensure(AUDIT_HMAC, secret_key(b"h" * 32))
    old = keys.kek
    new = fresh_kek("new")
    assert keys.reseal(new) == 3  # current, next, the HMAC secret
    assert KeyRing(KeyStore(store, new)).current.kid == ring.current.kid
    assert KeyStore(store, new).load(AUDIT_HMAC)[1][0].secret == b"h" * 32
    with pytest.raises(ConfigError, match="does not open"):
        KeyStore(store, old).load(JWT)


def test_a_failed_reseal_changes_nothing(store: Store) -> None:
    keys = key_store(store)
    KeyRing(keys)
    keys.ensure(AUDIT_HMAC, secret_key(b"h" * 32))
    with store.write() as s:  # one row no longer opens: the reseal must not half-happen
        s.execute(update(KeyRow).where(KeyRow.purpose == AUDIT_HMAC).values(sealed=b"\x01" * 40))
    before = rows(store)
    with pytest.raises(ConfigError, match="audit-hmac"):
        keys.reseal(fresh_kek("new"))
    assert rows(store) == before


@pytest.mark.integration
def test_replicas_starting_at_once_on_postgres_make_one_set_of_keys(pg_url: str) -> None:
    setup = Store(pg_url)
    setup.migrate()
    setup.close()
    kek = fresh_kek()
    stores = [Store(pg_url) for _ in range(4)]
    try:
        rings = at_once(4, lambda i: KeyRing(KeyStore(stores[i], kek)))
        hmacs = at_once(
            4, lambda i: KeyStore(stores[i], kek).ensure(AUDIT_HMAC, secret_key(bytes([i]) * 32))
        )
        assert len({r.jwks_json() for r in rings}) == 1
        assert len({k[0][0].secret for k in hmacs}) == 1
        assert sorted(created for _, created in hmacs) == [False, False, False, True]
        with stores[0].read() as s:
            count = len(s.scalars(select(KeyRow.kid)).all())
            generations = dict(s.execute(select(KeyRingRow.purpose, KeyRingRow.generation)).all())
        assert count == 3  # current, next, one HMAC secret
        assert generations[JWT] == 1 and generations[AUDIT_HMAC] == 1
    finally:
        for s in stores:
            s.close()


@pytest.mark.integration
def test_concurrent_rotations_on_postgres_serialise(pg_url: str) -> None:
    setup = Store(pg_url)
    setup.migrate()
    kek = fresh_kek()
    start = KeyRing(KeyStore(setup, kek))
    stores = [Store(pg_url) for _ in range(4)]
    try:

        def rotate(i: int) -> tuple[str, str, str | None]:
            keys = KeyStore(stores[i], kek)
            with stores[i].transaction() as conn:
                r = keys.rotate_jwt(conn, KeyRing.new_key().stored(NEXT))
            return r.kid, r.next_kid, r.retired_kid

        initial_current, initial_next = start.current.kid, start.next.kid
        done = at_once(4, rotate)
        # Each rotation saw the one before it: they form one chain, each taking over the next
        # key the one before published, and retiring the key that was current two before.
        order, expected, remaining = [], initial_next, list(done)
        while remaining:
            step = next(r for r in remaining if r[0] == expected)
            order.append(step)
            remaining.remove(step)
            expected = step[1]
        assert [r[2] for r in order] == [None, initial_current, initial_next, order[1][0]]
        assert start.refresh() and start.generation == 5
        assert (start.current.kid, start.next.kid) == order[-1][:2]
        assert start.previous is not None and start.previous.kid == order[-2][0]
    finally:
        for s in (*stores, setup):
            s.close()
