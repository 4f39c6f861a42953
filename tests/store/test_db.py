"""The store: migrations match the tables, UTC round trips, write failures fail closed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text

from broker.audit.log import AuditLog
from broker.errors import AuditUnavailable
from broker.store.db import Store, sqlite_url
from broker.store.tables import Base, EventRow, UsedTokenRow


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(sqlite_url(tmp_path))
    s.migrate()
    return s


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    return AuditLog.from_data_dir(tmp_path, "test/audit")


def test_migrations_create_exactly_the_tables(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_migrate_is_idempotent(store: Store) -> None:
    store.migrate()
    with store.read() as s:
        assert s.execute(text("SELECT size FROM log_head")).scalar_one() == 0


def test_datetimes_come_back_aware_utc(store: Store) -> None:
    at = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with store.write() as s:
        s.add(UsedTokenRow(issuer="i", jti="j", expires_at=at))
    with store.read() as s:
        row = s.scalars(select(UsedTokenRow)).one()
    assert row.expires_at == at and row.expires_at.tzinfo == dt.UTC


def test_a_rolled_back_append_leaves_no_gap(store: Store, audit: AuditLog) -> None:
    now = dt.datetime.now(dt.UTC)
    with store.write() as s:
        audit.append(s, "a", now, {})
    with pytest.raises(RuntimeError), store.write() as s:
        audit.append(s, "b", now, {})
        raise RuntimeError("boom")
    with store.write() as s:
        assert audit.append(s, "c", now, {}) == 1
    with store.read() as s:
        assert [r.type for r in s.scalars(select(EventRow).order_by(EventRow.idx))] == ["a", "c"]


def test_oversized_events_are_refused(store: Store, audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="limit"), store.write() as s:
        audit.append(s, "big", dt.datetime.now(dt.UTC), {"x": "y" * 70000})


def test_database_failure_becomes_audit_unavailable(store: Store, audit: AuditLog) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE log_head")
    with pytest.raises(AuditUnavailable, match="nothing was issued"), store.write() as s:
        audit.append(s, "x", dt.datetime.now(dt.UTC), {})
