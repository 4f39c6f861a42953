"""Rows processed ahead and inserted through the driver (broker.store.bulk) are stored exactly
as SQLAlchemy stores them: the same value and the same SQLite type in every column, for the
tables the group commit writes; and they read back through the ORM as the same objects."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Table, bindparam, insert, select, text, update
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.exc import IntegrityError

from broker.store import bulk
from broker.store.bulk import execute, insert_new, insert_processed, process, raw_rows, select_in
from broker.store.db import Store, sqlite_url
from broker.store.tables import (
    EventRow,
    GrantRow,
    LogHeadRow,
    TreeNodeRow,
    UsedTokenRow,
    UTCDateTime,
    sqlite_utc_text,
)

WHEN = dt.datetime(2026, 12, 1, 14, 20, 18, 123456, tzinfo=dt.UTC)
LATER = dt.datetime(2026, 12, 1, 15, 20, 18, tzinfo=dt.timezone(dt.timedelta(hours=2)))


def grant(n: int, **changes: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": f"g_{n:04d}",
        "issuer": "github",
        "issuer_url": "https://token.actions.githubusercontent.com",
        "subject": "repo:acme/evals:ref:refs/heads/main",
        "identity_claims": {"repository": "acme/evals", "nested": {"ü": [1, 2.5, None, True]}},
        "subject_jti": f"jti-{n}",
        "model": "llama-7b",
        "action": "evaluate",
        "tier": "standard",
        "backend": "jwt",
        "rule": "dev-nightly-eval",
        "policy_digest": "sha256:" + "ab" * 32,
        "audience": None,
        "reason": "a reason with 'quotes' and \"doubles\" and ☃",
        "lineage": None,
        "approval_id": None,
        "issued_at": WHEN,
        "expires_at": LATER,
        "status": "active",
        "credential_ref": None,
    }
    return row | changes


ROWS: dict[type[Any], list[dict[str, Any]]] = {
    GrantRow: [
        grant(1),
        grant(2, lineage={"datasets": ["s3://d/a"]}, audience="model:llama-7b", reason=None),
        grant(3, identity_claims={}, credential_ref="vault:accessor", approval_id="ap_1"),
    ],
    EventRow: [
        {"idx": 0, "type": "exchange.allowed", "at": WHEN, "grant_id": "g_0001", "body": b"{}"},
        {"idx": 1, "type": "exchange.denied", "at": LATER, "grant_id": None, "body": b"\x00\xff"},
    ],
    TreeNodeRow: [
        {"level": 0, "idx": 0, "hash": bytes(range(32))},
        {"level": 1, "idx": 0, "hash": b"\xff" * 32},
    ],
    UsedTokenRow: [
        {"issuer": "dev", "jti": "a", "expires_at": WHEN},
        {"issuer": "dev", "jti": "b", "expires_at": LATER},
    ],
}


def stored(store: Store, table: Table) -> list[tuple[Any, ...]]:
    """Every column of every row as SQLite has it: (typeof, value) pairs, in primary key order."""
    columns = ", ".join(f"typeof({c.name}), {c.name}" for c in table.columns)
    order = ", ".join(c.name for c in table.primary_key.columns)
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(f"SELECT {columns} FROM {table.name} ORDER BY {order}")]  # noqa: E501  # fmt: skip


@pytest.mark.parametrize("row_type", list(ROWS), ids=lambda t: t.__tablename__)
def test_processed_rows_are_stored_as_sqlalchemy_stores_them(
    tmp_path: Path, row_type: type[Any]
) -> None:
    table = row_type.__table__
    assert isinstance(table, Table)
    rows = ROWS[row_type]
    stores = []
    for name in ("sqlalchemy", "ahead", "here"):
        (tmp_path / name).mkdir()
        store = Store(sqlite_url(tmp_path / name))
        store.migrate()
        stores.append(store)
    by_sqlalchemy, ahead, here = stores
    try:
        with by_sqlalchemy.engine.begin() as conn:
            conn.execute(insert(table), rows)
        with ahead.engine.begin() as conn:
            assert raw_rows(conn.dialect)
            done = [process(conn.dialect, table, row) for row in rows]
            insert_processed(conn, insert(table), done)
        with here.engine.begin() as conn:  # the statement that spends tokens, on any table
            done = [process(conn.dialect, table, row) for row in rows]
            keys = [c.name for c in table.primary_key.columns]
            new = insert_new(conn, table, done, keys)
            assert sorted(tuple(r) for r in new) == sorted(tuple(r[k] for k in keys) for r in rows)
        expected = stored(by_sqlalchemy, table)
        assert len(expected) == len(rows)
        assert stored(ahead, table) == expected
        assert stored(here, table) == expected
        with ahead.read() as session:  # and the ORM reads them back as it wrote them
            again = session.query(row_type).order_by(*table.primary_key.columns).all()
            for obj, row in zip(again, rows, strict=True):
                for key, value in row.items():
                    if isinstance(value, dt.datetime):
                        assert getattr(obj, key) == value.astimezone(dt.UTC)
                    else:
                        assert getattr(obj, key) == value
    finally:
        for store in stores:
            store.close()


def test_a_row_of_another_table_or_an_unknown_column_is_refused(tmp_path: Path) -> None:
    store = Store(sqlite_url(tmp_path))
    store.migrate()
    try:
        events, tokens = EventRow.__table__, UsedTokenRow.__table__
        assert isinstance(events, Table) and isinstance(tokens, Table)
        with store.engine.begin() as conn:
            with pytest.raises(KeyError):
                process(conn.dialect, tokens, {"issuer": "dev", "jti": "x", "nope": 1})
            token = process(conn.dialect, tokens, ROWS[UsedTokenRow][0])
            with pytest.raises(ValueError, match="a row of used_tokens"):
                insert_processed(conn, insert(events), [token])
            assert conn.execute(text("SELECT count(*) FROM events")).scalar() == 0
    finally:
        store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(sqlite_url(tmp_path))
    s.migrate()
    try:
        yield s
    finally:
        s.close()


def test_insert_new_inserts_only_the_rows_whose_key_is_free_over_several_chunks(
    store: Store,
) -> None:
    tokens = UsedTokenRow.__table__
    assert isinstance(tokens, Table)
    count = bulk.CHUNK_ROWS * 2 + 7
    taken = {f"j{n}" for n in range(0, count, 3)}
    with store.engine.begin() as conn:
        conn.execute(
            insert(tokens), [{"issuer": "dev", "jti": j, "expires_at": WHEN} for j in taken]
        )
    with store.engine.begin() as conn:
        rows = [
            process(conn.dialect, tokens, {"issuer": "dev", "jti": f"j{n}", "expires_at": LATER})
            for n in range(count)
        ]
        new = insert_new(conn, tokens, rows, ["issuer", "jti"])
    assert sorted(jti for _, jti in new) == sorted(
        f"j{n}" for n in range(count) if f"j{n}" not in taken
    )
    with store.engine.connect() as conn:
        stored_at = dict(conn.exec_driver_sql("SELECT jti, expires_at FROM used_tokens").all())
    assert len(stored_at) == count
    assert {j for j, at in stored_at.items() if at.startswith("2026-12-01 14:20")} == taken


def test_insert_new_refuses_rows_of_another_table_or_other_columns(store: Store) -> None:
    tokens, events = UsedTokenRow.__table__, EventRow.__table__
    assert isinstance(tokens, Table) and isinstance(events, Table)
    with store.engine.begin() as conn:
        token = process(conn.dialect, tokens, ROWS[UsedTokenRow][0])
        fewer = process(conn.dialect, tokens, {"issuer": "dev", "jti": "z"})
        with pytest.raises(ValueError, match="another table or other columns"):
            insert_new(conn, events, [token], ["idx"])
        with pytest.raises(ValueError, match="another table or other columns"):
            insert_new(conn, tokens, [token, fewer], ["jti"])
        assert conn.exec_driver_sql("SELECT count(*) FROM used_tokens").scalar() == 0


def test_select_in_finds_exactly_the_wanted_keys_over_several_chunks(store: Store) -> None:
    nodes = TreeNodeRow.__table__
    assert isinstance(nodes, Table)
    stored_nodes = {
        (level, i): bytes([level, i % 256]) * 16 for level in range(3) for i in range(150)
    }
    with store.engine.begin() as conn:
        conn.execute(
            insert(nodes),
            [{"level": lv, "idx": i, "hash": h} for (lv, i), h in stored_nodes.items()],
        )
    wanted = [(lv, i) for lv in range(4) for i in range(0, 160, 2)]  # level 3, idx >= 150: none
    with store.engine.connect() as conn:
        found = select_in(conn, nodes, ["level", "idx", "hash"], ["level", "idx"], wanted)
    assert len(wanted) > bulk.CHUNK_ROWS
    assert {(level, i): h for level, i, h in found} == {
        key: h for key, h in stored_nodes.items() if key in set(wanted)
    }


def test_execute_keeps_the_statements_values_and_refuses_what_needs_processing(
    store: Store,
) -> None:
    heads = LogHeadRow.__table__
    grants = GrantRow.__table__
    assert isinstance(heads, Table) and isinstance(grants, Table)
    read = select(heads.c.size).where(heads.c.id == 1)
    with store.engine.begin() as conn:
        assert raw_rows(conn.dialect)
        execute(conn, update(heads).where(heads.c.id == 1).values(size=bindparam("n")), {"n": 41})
        assert execute(conn, read) == [(41,)]
        assert execute(conn, select(heads.c.size).where(heads.c.id == 2)) == []
        for needs_processing in (
            update(grants).values(expires_at=bindparam("at")),  # a time: its processor
            select(heads.c.size).where(heads.c.id.in_(bindparam("ids", expanding=True))),
        ):
            with pytest.raises(ValueError, match="needs processing first"):
                execute(conn, needs_processing, {"at": WHEN, "ids": [1]})


def test_a_driver_error_is_raised_as_sqlalchemys_without_its_parameters(store: Store) -> None:
    """What the group commit's failure handling expects of any statement (broker.store.db):
    SQLAlchemy's error, the driver's as its cause, and no row values in the message."""
    tokens = UsedTokenRow.__table__
    assert isinstance(tokens, Table)
    with store.engine.begin() as conn:
        row = process(
            conn.dialect, tokens, {"issuer": "dev", "jti": "secretish", "expires_at": WHEN}
        )
        insert_processed(conn, insert(tokens), [row])
        with pytest.raises(IntegrityError) as raised:
            insert_processed(conn, insert(tokens), [row])
        assert isinstance(raised.value.orig, sqlite3.IntegrityError)
        assert "secretish" not in str(raised.value)


_OFFSETS = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: dt.timezone(dt.timedelta(minutes=minutes))
)


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(
        min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=_OFFSETS
    )
)
def test_a_utc_timestamp_is_stored_as_sqlalchemys_two_processors_store_it(
    at: dt.datetime,
) -> None:
    """The one-step processor bulk uses for UTCDateTime on SQLite writes the same text as the
    type's process_bind_param followed by SQLite's DATETIME processor."""
    dialect = sqlite_dialect()
    theirs = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    assert theirs is not None
    ours = bulk._processor(dialect, GrantRow.__table__.c.issued_at)
    assert ours is sqlite_utc_text
    assert ours(at) == theirs(at)
    assert ours(None) is None and theirs(None) is None
    naive = at.replace(tzinfo=None)
    for processor in (ours, theirs):
        with pytest.raises(ValueError, match="naive"):
            processor(naive)
