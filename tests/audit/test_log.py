"""The log on the store: appends keep the tree exact, checkpoints are never inconsistent."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select, update

from broker.audit.checkpoint import NoteVerifier
from broker.audit.log import (
    AuditIntegrityError,
    AuditLog,
    NewEvent,
    StoreHashReader,
    prepare_event,
)
from broker.audit.merkle import (
    leaf_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)
from broker.errors import InvalidRequest
from broker.keys.store import KeyStore
from broker.store.db import Store, sqlite_url
from broker.store.tables import EventRow, LogHeadRow, TreeNodeRow
from tests.keys.support import key_store

NOW = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(sqlite_url(tmp_path))
    s.migrate()
    return s


@pytest.fixture
def keys(store: Store) -> KeyStore:
    return key_store(store)


@pytest.fixture
def audit(keys: KeyStore, tmp_path: Path) -> AuditLog:
    return AuditLog.from_store(keys, data_dir=tmp_path, default_origin="test.example/audit")


def bodies(store: Store) -> list[bytes]:
    with store.read() as s:
        return list(s.scalars(select(EventRow.body).order_by(EventRow.idx)))


def test_every_append_keeps_the_stored_tree_exact(
    store: Store, keys: KeyStore, audit: AuditLog, tmp_path: Path
) -> None:
    other = AuditLog.from_store(
        keys, data_dir=tmp_path
    )  # a second process: its cache is always stale
    expected = 0
    for n in range(1, 40):
        log = audit if n % 3 else other
        with store.write() as s:
            assert log.append(s, "t", NOW, {"n": n}) == expected
            expected += 1
            if n % 5 == 0:  # several appends in one transaction
                assert log.append(s, "t", NOW, {"n": n, "second": True}) == expected
                expected += 1
        leaves = bodies(store)
        with store.read() as s:
            assert audit.root(s, len(leaves)) == root_from_leaves(leaves)


def test_a_rolled_back_append_does_not_poison_the_cache(store: Store, audit: AuditLog) -> None:
    with store.write() as s:
        audit.append(s, "a", NOW, {})
    with pytest.raises(RuntimeError), store.write() as s:
        audit.append(s, "rolled-back", NOW, {})
        raise RuntimeError
    with store.write() as s:
        audit.append(s, "b", NOW, {})
    leaves = bodies(store)
    assert [b"rolled-back" in b for b in leaves] == [False, False]
    with store.read() as s:
        assert audit.root(s, 2) == root_from_leaves(leaves)


@pytest.mark.parametrize("prepared", [False, True], ids=["events", "prepared events"])
def test_batched_appends_keep_the_stored_tree_exact(
    store: Store, keys: KeyStore, audit: AuditLog, tmp_path: Path, prepared: bool
) -> None:
    other = AuditLog.from_store(
        keys, data_dir=tmp_path
    )  # a second process: its cache is always stale
    big = {"x": "y" * 70000}
    expected = 0
    dialect = store.engine.dialect
    for n in range(1, 25):
        log = audit if n % 3 else other
        events = [NewEvent("t", NOW, {"n": n, "k": k}, grant_id=f"g{k}") for k in range(n % 5)]
        if n % 4 == 0:  # too large: refused alone, takes no index
            events.insert(n % 3, NewEvent("big", NOW, big))
        # Prepared (encoded but for the index, as the exchange does before the write lock),
        # all but every third, so that a batch mixes both kinds.
        given = [
            prepare_event(e, dialect) if prepared and i % 3 else e for i, e in enumerate(events)
        ]
        with store.transaction() as conn:
            results, frontier = log.append_batch(conn, given)
        if frontier is not None:
            log.committed(frontier)
        appended = [r for r in results if isinstance(r, int)]
        assert appended == list(range(expected, expected + len(appended)))
        assert [isinstance(r, ValueError) for r in results] == [e.type == "big" for e in events]
        expected += len(appended)
        if n % 2:  # single appends in between, through an ORM session
            with store.write() as s:
                assert log.append(s, "single", NOW, {"n": n}) == expected
            expected += 1
        leaves = bodies(store)
        assert len(leaves) == expected
        with store.read() as s:
            assert audit.root(s, len(leaves)) == root_from_leaves(leaves)
    assert any(b'"grant_id":"g1"' in body for body in bodies(store))


def test_a_rolled_back_batch_does_not_poison_the_cache(store: Store, audit: AuditLog) -> None:
    with store.write() as s:
        audit.append(s, "a", NOW, {})
    with pytest.raises(RuntimeError), store.transaction() as conn:
        audit.append_batch(conn, [NewEvent("rolled-back", NOW, {}), NewEvent("too", NOW, {})])
        raise RuntimeError  # so the frontier is never handed to committed()
    for name in ("b", "c", "d"):
        with store.transaction() as conn:
            _, frontier = audit.append_batch(conn, [NewEvent(name, NOW, {})])
        assert frontier is not None
        audit.committed(frontier)
    leaves = bodies(store)
    assert [b"rolled-back" in b for b in leaves] == [False] * 4
    with store.read() as s:
        assert audit.root(s, 4) == root_from_leaves(leaves)


def test_leaves_carry_their_index_and_canonical_bytes(store: Store, audit: AuditLog) -> None:
    with store.write() as s:
        audit.append(s, "x", NOW, {"b": 1, "a": "é"})
    [body] = bodies(store)
    assert (
        body
        == (
            '{"a":"é","at":"2026-11-25T00:00:00.000Z","b":1,"grant_id":null,"idx":0,"type":"x","v":1}'
        ).encode()
    )


def test_proofs_verify_against_signed_checkpoints(store: Store, audit: AuditLog) -> None:
    verifier = NoteVerifier.from_vkey(audit.verifier_key())
    for n in range(7):
        with store.write() as s:
            audit.append(s, "t", NOW, {"n": n})
    with store.write() as s:
        old = audit.sign_checkpoint(s, NOW)
    for n in range(6):
        with store.write() as s:
            audit.append(s, "t", NOW, {"m": n})
    with store.write() as s:
        new = audit.sign_checkpoint(s, NOW)
        assert audit.sign_checkpoint(s, NOW) == new  # nothing new: the same checkpoint
    assert (old.size, new.size) == (7, 13)
    assert verifier.verify(new.note.encode()).root == new.root
    leaves = bodies(store)
    with store.read() as s:
        for i, leaf in enumerate(leaves):
            proof = audit.inclusion_proof(s, i, new.size)
            assert verify_inclusion(leaf_hash(leaf), i, new.size, proof, new.root)
        proof = audit.consistency_proof(s, old.size, new.size)
        assert verify_consistency(old.size, new.size, old.root, new.root, proof)
        with pytest.raises(InvalidRequest, match="size"):
            audit.inclusion_proof(s, 0, 99)
        with pytest.raises(InvalidRequest, match="from/to"):
            audit.consistency_proof(s, 9, 3)


def test_never_signs_over_a_rewritten_tree(store: Store, keys: KeyStore, audit: AuditLog) -> None:
    for n in range(4):
        with store.write() as s:
            audit.append(s, "t", NOW, {"n": n})
    with store.write() as s:
        audit.sign_checkpoint(s, NOW)
    with store.write() as s:
        s.execute(update(TreeNodeRow).where(TreeNodeRow.level == 2).values(hash=b"\x00" * 32))
    fresh = AuditLog.from_store(
        keys, data_dir=Path(str(store.url).removeprefix("sqlite:///")).parent
    )
    with store.write() as s:
        fresh.append(s, "t", NOW, {"n": 4})
    with pytest.raises(AuditIntegrityError, match="history was rewritten"), store.write() as s:
        fresh.sign_checkpoint(s, NOW)
    # Without the anchor, the checkpoint stored with the log still refuses it.
    assert fresh.anchor is not None
    fresh.anchor.path.unlink()
    with pytest.raises(AuditIntegrityError, match="not consistent"), store.write() as s:
        fresh.sign_checkpoint(s, NOW)


def test_the_origin_is_fixed_when_the_log_is_created(keys: KeyStore, tmp_path: Path) -> None:
    first = AuditLog.from_store(keys, data_dir=tmp_path, default_origin="a.example/audit")
    again = AuditLog.from_store(keys, data_dir=None, default_origin="b.example:9999/audit")
    assert again.origin == "a.example/audit"
    assert again.verifier_key() == first.verifier_key()
    # Nothing of the log's keys is left in the data dir: they are sealed in the store.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "broker.db",
        "broker.db-shm",
        "broker.db-wal",
        "broker.db-writer.lock",  # the store's cross-process writer lock, no key
    ]


def test_token_hmac_is_keyed(tmp_path: Path) -> None:
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    stores = [Store(sqlite_url(tmp_path / n)) for n in ("one", "two")]
    for s in stores:
        s.migrate()
    one, two = (
        AuditLog.from_store(key_store(s), data_dir=None, default_origin="x/audit") for s in stores
    )
    assert one.token_hmac("tok") == one.token_hmac("tok")
    assert one.token_hmac("tok") != two.token_hmac("tok")
    assert one.token_hmac("tok") != "hmac-sha256:" + hashlib.sha256(b"tok").hexdigest()
    for s in stores:
        s.close()


def test_store_hash_reader_refuses_missing_nodes(store: Store) -> None:
    with store.read() as s, pytest.raises(LookupError):
        StoreHashReader(s).get_node(0, 0)


def test_the_driver_path_stores_what_sqlalchemy_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite the batch goes through the driver (broker.store.bulk); with that turned off it
    goes through SQLAlchemy. Both leave the same rows, value and SQLite type, in every table the
    append writes, through a frontier reloaded from the stored nodes as well."""
    from broker.audit import log as audit_log
    from broker.store import bulk
    from tests.store.test_bulk import stored

    def appended(name: str) -> dict[str, list[tuple[object, ...]]]:
        (tmp_path / name).mkdir()
        store = Store(sqlite_url(tmp_path / name))
        store.migrate()
        try:
            keys = key_store(store)
            for n in range(1, 9):
                # A new log each batch (as another process): it reloads the frontier.
                log = AuditLog.from_store(
                    keys, data_dir=tmp_path / name, default_origin="test.example/audit"
                )
                events = [
                    NewEvent("t", NOW + dt.timedelta(seconds=k), {"n": n, "k": k}, f"g{k}")
                    for k in range(n)
                ]
                # Whole, prepared for the store, and prepared without a dialect: one of each.
                dialect = store.engine.dialect
                given = [
                    [e, prepare_event(e, dialect), prepare_event(e)][k % 3]
                    for k, e in enumerate(events)
                ]
                with store.transaction() as conn:
                    log.append_batch(conn, given)
            tables = (EventRow, TreeNodeRow, LogHeadRow)
            return {t.__tablename__: stored(store, t.__table__) for t in tables}
        finally:
            store.close()

    through_driver = appended("driver")
    with monkeypatch.context() as patched:
        for module in (audit_log, bulk):
            patched.setattr(module, "raw_rows", lambda _dialect: False)
        through_sqlalchemy = appended("sqlalchemy")
    assert len(through_driver["events"]) == sum(range(1, 9))
    assert through_driver == through_sqlalchemy
