"""Rows processed ahead and inserted through the driver (broker.store.bulk) are stored exactly
as SQLAlchemy stores them: the same value and the same SQLite type in every column, for the
tables the group commit writes; and they read back through the ORM as the same objects."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Table, insert, text

from broker.store.bulk import insert_processed, insert_rows, process, raw_rows
from broker.store.db import Store, sqlite_url
from broker.store.tables import EventRow, GrantRow, TreeNodeRow, UsedTokenRow

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
        with here.engine.begin() as conn:
            insert_rows(conn, insert(table), rows)
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
