"""A KeyStore on a store, with a KEK made for the test."""

from __future__ import annotations

import os
from pathlib import Path

from broker.keys.kek import Kek, generate
from broker.keys.store import KeyStore
from broker.store.db import Store


def fresh_kek(name: str = "the test's KEK") -> Kek:
    return Kek(os.urandom(32), name)


def key_store(store: Store, kek: Kek | None = None) -> KeyStore:
    return KeyStore(store, kek or fresh_kek())


def kek_file(path: Path) -> Path:
    """A KEK file as `broker keys kek generate --out` writes it (0600)."""
    path.write_text(generate() + "\n")
    path.chmod(0o600)
    return path
