"""The keys table: every key the broker holds, sealed with the KEK, shared by its replicas.

Creating a purpose's keys and rotating them take the lock of that purpose's ``key_rings``
row (PostgreSQL: ``SELECT ... FOR UPDATE``; SQLite: the write lock every write transaction
holds), so two replicas starting at once on an empty database end with one set of keys, and
two rotations at once run one after the other. Each change bumps the row's ``generation``:
replicas find out that keys changed by reading that one integer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Row, Table, delete, insert, inspect, select, update

from broker.errors import AuditUnavailable, ConfigError
from broker.keys.kek import Kek
from broker.keys.sealing import SealError, seal, unseal
from broker.store.db import Store
from broker.store.tables import KeyRingRow, KeyRow

JWT, AUDIT_SIGNING, AUDIT_HMAC, DEV_ISSUER = "jwt", "audit-signing", "audit-hmac", "dev-issuer"
CONSOLE_COOKIE = "console-cookie"
"""The console's AES-256-GCM key for its session and sign-in cookies (``broker.console``)."""
PURPOSES = (JWT, AUDIT_SIGNING, AUDIT_HMAC, DEV_ISSUER, CONSOLE_COOKIE)
ACTIVE = "active"
"""The slot of a purpose that has one key."""
NEXT, CURRENT, PREVIOUS = "next", "current", "previous"
"""The slots of the JWT signing keys (see :class:`broker.backends.keys.KeyRing`)."""


@dataclass(frozen=True)
class NewKey:
    """A key to store: its id, slot, label (not secret, but bound to the sealed blob) and
    secret bytes (a PKCS#8 DER private key, or a raw secret)."""

    kid: str
    slot: str
    secret: bytes = field(repr=False)
    label: str = ""


@dataclass(frozen=True)
class StoredKey(NewKey):
    """A key as opened from the store."""


@dataclass(frozen=True)
class Rotation:
    """What a JWT key rotation did: ``kid`` signs now, ``next_kid`` is published to sign after
    the next rotation, ``retired_kid`` (if any) is gone."""

    kid: str
    next_kid: str
    retired_kid: str | None
    generation: int


_KEYS = KeyRow.__table__
assert isinstance(_KEYS, Table)
Make = Callable[[], Sequence[NewKey]]


class KeyStore:
    """Reads, creates and rotates the sealed keys of ``store`` with ``kek``."""

    def __init__(self, store: Store, kek: Kek) -> None:
        self.store = store
        self.kek = kek

    def generation(self, purpose: str) -> int:
        """The purpose's change counter (one indexed read, nothing decrypted)."""
        with self.store.read() as session:
            found = session.execute(
                select(KeyRingRow.generation).where(KeyRingRow.purpose == purpose)
            ).scalar()
        return int(found or 0)

    def load(self, purpose: str) -> tuple[int, list[StoredKey]]:
        """The purpose's generation and keys, opened. Raises ConfigError when one does not
        open (never replaced by a new key: fail closed), AuditUnavailable when the store
        cannot be read."""
        with self.store.read() as session:
            conn = session.connection()
            generation = conn.execute(
                select(KeyRingRow.generation).where(KeyRingRow.purpose == purpose)
            ).scalar()
            rows = conn.execute(select(_KEYS).where(KeyRow.purpose == purpose)).all()
        return int(generation or 0), [self._open(r) for r in rows]

    def find(self, purpose: str) -> list[StoredKey]:
        """The purpose's keys, or none; [] too when the store predates the keys table (a
        read-only caller on a database no new broker has opened). Raises ConfigError."""
        with self.store.engine.connect() as conn:
            if not inspect(conn).has_table(KeyRow.__tablename__):
                return []
        return self.load(purpose)[1]

    def ensure(self, purpose: str, make: Make) -> tuple[list[StoredKey], bool]:
        """The purpose's keys; when it has none, the keys ``make`` returns, stored. Returns
        them and whether this call stored them. Race-free across processes: the first to
        take the purpose's lock stores its keys, the others find them. Raises ConfigError
        (a key does not open), AuditUnavailable."""
        keys = self.load(purpose)[1]
        if keys:
            return keys, False
        with self.store.transaction() as conn:
            generation = self._lock(conn, purpose)
            rows = conn.execute(select(_KEYS).where(KeyRow.purpose == purpose)).all()
            if rows:
                return [self._open(r) for r in rows], False
            new = list(make())
            conn.execute(insert(KeyRow), [self._row(purpose, k) for k in new])
            self._bump(conn, purpose, generation)
        return [StoredKey(k.kid, k.slot, k.secret, k.label) for k in new], True

    def rotate_jwt(self, conn: Connection, new: NewKey) -> Rotation:
        """Rotate the JWT signing keys in ``conn``'s transaction: next → current → previous,
        the previous is deleted, ``new`` becomes next. Serialised on the purpose's lock, so
        concurrent rotations (on any replica) each see the one before."""
        generation = self._lock(conn, JWT)
        slots = {
            r.slot: r.kid
            for r in conn.execute(select(KeyRow.slot, KeyRow.kid).where(KeyRow.purpose == JWT))
        }
        if CURRENT not in slots or NEXT not in slots:
            raise ConfigError("the store has no JWT signing keys to rotate")
        retired = slots.get(PREVIOUS)
        # In this order, no two rows ever hold one slot (the unique index).
        if retired is not None:
            conn.execute(delete(KeyRow).where(KeyRow.purpose == JWT, KeyRow.kid == retired))
        for old, moved in ((CURRENT, PREVIOUS), (NEXT, CURRENT)):
            conn.execute(
                update(KeyRow).where(KeyRow.purpose == JWT, KeyRow.slot == old).values(slot=moved)
            )
        conn.execute(insert(KeyRow), [self._row(JWT, NewKey(new.kid, NEXT, new.secret))])
        return Rotation(slots[NEXT], new.kid, retired, self._bump(conn, JWT, generation))

    def reseal(self, new: Kek) -> int:
        """Seal every key with ``new`` instead, in one transaction (a crash leaves all rows
        under the old KEK or all under the new one). Returns how many keys. Raises
        ConfigError when a key does not open with the current KEK."""
        with self.store.transaction() as conn:
            for purpose in PURPOSES:
                self._lock(conn, purpose)
            rows = conn.execute(select(_KEYS)).all()
            for row in rows:
                key = self._open(row)
                conn.execute(
                    update(KeyRow)
                    .where(KeyRow.purpose == row.purpose, KeyRow.kid == row.kid)
                    .values(sealed=seal(new.key, row.purpose, key.kid, key.label, key.secret))
                )
        self.kek = new
        return len(rows)

    def _open(self, row: Row[Any]) -> StoredKey:
        try:
            secret = unseal(self.kek.key, row.purpose, row.kid, row.label, row.sealed)
        except SealError as exc:
            raise ConfigError(
                f"the {row.purpose} key {row.kid} in the store does not open with the KEK "
                f"{self.kek.source}: {exc}. Start every replica with the KEK the keys were "
                "sealed with (BROKER_KEK_FILE); no key was replaced"
            ) from None
        return StoredKey(row.kid, row.slot, secret, row.label)

    def _row(self, purpose: str, key: NewKey) -> dict[str, object]:
        return {
            "purpose": purpose,
            "kid": key.kid,
            "slot": key.slot,
            "label": key.label,
            "sealed": seal(self.kek.key, purpose, key.kid, key.label, key.secret),
            "created_at": dt.datetime.now(dt.UTC),
        }

    @staticmethod
    def _lock(conn: Connection, purpose: str) -> int:
        generation = conn.execute(
            select(KeyRingRow.generation).where(KeyRingRow.purpose == purpose).with_for_update()
        ).scalar()
        if generation is None:
            raise ConfigError(f"the store has no key_rings row for {purpose}")
        return int(generation)

    @staticmethod
    def _bump(conn: Connection, purpose: str, seen: int) -> int:
        # Compare-and-set, though the row lock already serialises: a change that did not see
        # the one before it fails instead of overwriting it.
        done = conn.execute(
            update(KeyRingRow)
            .where(KeyRingRow.purpose == purpose, KeyRingRow.generation == seen)
            .values(generation=seen + 1)
        )
        if done.rowcount != 1:
            raise AuditUnavailable("the keys changed meanwhile; nothing was changed, try again")
        return seen + 1
