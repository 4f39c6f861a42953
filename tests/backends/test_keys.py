"""The KeyRing: the store's signing keys, the same bytes on every replica, fresh within
REFRESH_S of a rotation anywhere, and at once for a token with an unknown kid."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from sqlalchemy import update

from broker.backends.keys import REFRESH_S, UNKNOWN_KID_REFRESH_S, KeyRing
from broker.keys.store import JWT, KeyStore
from broker.store.db import Store, sqlite_url
from broker.store.tables import KeyRow
from tests.keys.support import key_store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingKeyStore(KeyStore):
    """The real KeyStore, counting how often the ring reads the store."""

    generations = 0
    loads = 0

    def generation(self, purpose: str) -> int:
        self.generations += 1
        return super().generation(purpose)

    def load(self, purpose: str) -> tuple[int, list]:  # type: ignore[type-arg]
        self.loads += 1
        return super().load(purpose)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(sqlite_url(tmp_path))
    s.migrate()
    yield s
    s.close()


def rotate(ring: KeyRing, store: Store) -> str:
    new = KeyRing.new_key()
    with store.write() as s:
        ring.rotate(s, new)
    assert ring.refresh()
    return new.kid


def test_two_rings_on_one_store_serve_the_same_bytes(store: Store) -> None:
    keys = key_store(store)
    one, two = KeyRing(keys), KeyRing(KeyStore(store, keys.kek))
    assert one.jwks_json() == two.jwks_json()
    assert [k["kid"] for k in one.jwks()["keys"]] == [one.current.kid, one.next.kid]


def test_a_rotation_elsewhere_is_seen_within_the_refresh_bound(store: Store) -> None:
    keys = key_store(store)
    clock = Clock()
    here = KeyRing(CountingKeyStore(store, keys.kek), clock=clock)
    elsewhere = KeyRing(KeyStore(store, keys.kek))
    before = here.jwks_json()
    new_next = rotate(elsewhere, store)
    clock.now += REFRESH_S / 2
    assert here.jwks_json() == before  # not yet due: no store read at all
    assert here._keys.generations == 0  # type: ignore[attr-defined]
    clock.now += REFRESH_S / 2
    assert here.jwks_json() == elsewhere.jwks_json() != before
    assert here.next.kid == new_next


def test_an_unchanged_generation_decrypts_nothing(store: Store) -> None:
    counting = CountingKeyStore(store, key_store(store).kek)
    clock = Clock()
    ring = KeyRing(counting, clock=clock)
    loads = counting.loads
    for _ in range(5):
        clock.now += REFRESH_S
        ring.jwks()
    assert counting.generations == 5 and counting.loads == loads


def test_a_token_with_an_unknown_kid_refreshes_at_once_but_rate_limited(store: Store) -> None:
    keys = key_store(store)
    clock = Clock()
    counting = CountingKeyStore(store, keys.kek)
    here = KeyRing(counting, clock=clock)
    elsewhere = KeyRing(KeyStore(store, keys.kek))
    rotate(elsewhere, store)
    token = jwt.encode({"sub": "x"}, elsewhere.current.private, algorithm="ES256")
    assert here.public_key(elsewhere.current.kid) is not None  # no clock advance needed
    jwt.decode(token, here.public_key(elsewhere.current.kid), algorithms=["ES256"])
    reads = counting.generations
    clock.now += UNKNOWN_KID_REFRESH_S
    for _ in range(10):
        assert here.public_key("no-such-kid") is None
    assert counting.generations == reads + 1
    clock.now += UNKNOWN_KID_REFRESH_S
    here.public_key("no-such-kid")
    assert counting.generations == reads + 2


def test_keys_that_no_longer_open_leave_the_ring_as_it_was(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    keys = key_store(store)
    ring = KeyRing(keys)
    before = ring.jwks_json()
    rotate(KeyRing(KeyStore(store, keys.kek)), store)
    with store.write() as s:
        s.execute(update(KeyRow).where(KeyRow.purpose == JWT).values(sealed=b"\x01" * 60))
    with caplog.at_level(logging.ERROR, "broker.keys"):
        assert not ring.refresh()
    assert ring.jwks_json() == before
    assert "were not refreshed" in caplog.text and "does not open" in caplog.text


def test_only_signers_verify_introspected_tokens(store: Store) -> None:
    ring = KeyRing(key_store(store))
    assert ring.public_key(ring.current.kid) is not None
    assert ring.public_key(ring.next.kid) is None  # published, but has signed nothing yet
