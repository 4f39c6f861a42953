"""Rows for the SQLite group commit, their values processed before the write lock.

NOTE: why (docs/performance.md, "Results after the event-loop exchange"): with two workers the
store's write lock was held two thirds of the time, and over half of a batch's statements'
time was SQLAlchemy's execution path turning each row's values into the driver's (the column
types' bind processors: JSON, UTC timestamps) and building its parameters. Here a row goes
through the same bind processors once, when its exchange is queued (before the lock), and the
batch under the lock is one ``executemany`` of plain tuples through ``exec_driver_sql``. What is
stored is what SQLAlchemy stores (``tests/store/test_bulk.py`` compares the two, value and
SQLite type, column by column). Other dialects keep SQLAlchemy's own path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Insert, Table
from sqlalchemy.engine import Dialect

Processor = Callable[[Any], Any] | None


@dataclass(frozen=True, slots=True)
class Processed:
    """One row of ``table``: its column names and their values as the driver takes them."""

    table: Table
    keys: tuple[str, ...]
    values: tuple[Any, ...]


_shapes: dict[tuple[int, str, tuple[str, ...]], tuple[str, list[Processor]]] = {}
_lock = threading.Lock()


def raw_rows(dialect: Dialect) -> bool:
    """Whether rows are processed ahead and inserted through the driver for ``dialect``."""
    return dialect.name == "sqlite" and dialect.paramstyle == "qmark"


def process(dialect: Dialect, table: Table, row: Mapping[str, Any]) -> Processed:
    """``row`` (column name → value) through each column type's bind processor for
    ``dialect``, as SQLAlchemy would at execute time (None included: a JSON column stores
    None as ``null``). KeyError for a name that is not a column of ``table``."""
    keys = tuple(row)
    _, processors = _shape(dialect, table, keys)
    values = tuple(
        value if proc is None else proc(value)
        for value, proc in zip(row.values(), processors, strict=True)
    )
    return Processed(table, keys, values)


def insert_processed(conn: Connection, statement: Insert, rows: Sequence[Processed]) -> None:
    """Insert rows :func:`process` made for ``conn``'s dialect into ``statement``'s table, one
    driver ``executemany`` per set of column names."""
    by_keys: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for row in rows:
        if row.table is not statement.table:
            raise ValueError(f"a row of {row.table.name} for {statement.table}")
        by_keys.setdefault(row.keys, []).append(row.values)
    for keys, values in by_keys.items():
        assert isinstance(statement.table, Table)
        sql, _ = _shape(conn.dialect, statement.table, keys)
        conn.exec_driver_sql(sql, values)


def insert_rows(conn: Connection, statement: Insert, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (dicts of column values): processed here and through the driver where
    :func:`raw_rows`, else with SQLAlchemy's executemany."""
    if not rows:
        return
    table = statement.table
    if not raw_rows(conn.dialect) or not isinstance(table, Table):
        conn.execute(statement, list(rows))
        return
    insert_processed(conn, statement, [process(conn.dialect, table, row) for row in rows])


def _shape(dialect: Dialect, table: Table, keys: tuple[str, ...]) -> tuple[str, list[Processor]]:
    """The INSERT of ``keys`` into ``table`` for the driver, and each column's processor."""
    cache_key = (id(table), dialect.name, keys)
    with _lock:
        found = _shapes.get(cache_key)
    if found is not None:
        return found
    columns = [table.c[key] for key in keys]
    quote = dialect.identifier_preparer
    names = ", ".join(quote.format_column(c) for c in columns)
    marks = ", ".join("?" for _ in columns)
    # Names from the table's metadata, quoted by the dialect; every value is a parameter.
    sql = f"INSERT INTO {quote.format_table(table)} ({names}) VALUES ({marks})"  # noqa: S608
    processors: list[Processor] = [
        c.type.dialect_impl(dialect).bind_processor(dialect) for c in columns
    ]
    with _lock:
        _shapes[cache_key] = (sql, processors)
    return sql, processors
