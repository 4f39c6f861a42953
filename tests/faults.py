"""Real store failures for fail-closed tests: a SQLite trigger that aborts every insert into one
table of a broker's database file, installed from outside the broker (as a full disk or a
broken replica would surprise it), and removed again however the test ends."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager

from sqlalchemy import select

from broker.runtime import Broker
from broker.store.tables import GrantRow

TRIGGER = "test_blocks_inserts"


@contextmanager
def inserts_blocked(broker: Broker, table: str) -> Iterator[None]:
    """While inside, every INSERT into ``table`` of ``broker``'s SQLite database fails (the
    broker's own pooled connections see the trigger at their next statement)."""
    path = broker.store.engine.url.database
    assert path, "a SQLite broker is needed"
    name = f"{TRIGGER}_{table}"
    with closing(sqlite3.connect(path, timeout=10, isolation_level=None)) as conn:
        conn.execute(
            f"CREATE TRIGGER {name} BEFORE INSERT ON {table} "
            f"BEGIN SELECT RAISE(ABORT, 'inserts into {table} are blocked by a test'); END"
        )
    try:
        yield
    finally:
        with closing(sqlite3.connect(path, timeout=10, isolation_level=None)) as conn:
            conn.execute(f"DROP TRIGGER IF EXISTS {name}")


def grant_statuses(broker: Broker) -> dict[str, str]:
    """Every grant's stored status, by id."""
    with broker.store.read() as session:
        return {row.id: row.status for row in session.scalars(select(GrantRow))}
