"""A KeyStore on a store, with a KEK made for the test."""

from __future__ import annotations

import os

from broker.keys.kek import Kek
from broker.keys.store import KeyStore
from broker.store.db import Store


def fresh_kek(name: str = "the test's KEK") -> Kek:
    return Kek(os.urandom(32), name)


def key_store(store: Store, kek: Kek | None = None) -> KeyStore:
    return KeyStore(store, kek or fresh_kek())
