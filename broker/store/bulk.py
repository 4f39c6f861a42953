"""Rows for the SQLite group commit, their values processed before the write lock.

NOTE: why (docs/performance.md, "Results after the event-loop exchange"): with two workers the
store's write lock was held two thirds of the time, and over half of a batch's statements'
time was SQLAlchemy's execution path turning each row's values into the driver's (the column
types' bind processors: JSON, UTC timestamps) and building its parameters. Here a row goes
through the same bind processors once, when its exchange is queued (before the lock), and the
batch under the lock is one driver ``executemany`` of plain tuples per table. What is
stored is what SQLAlchemy stores (``tests/store/test_bulk.py`` compares the two, value and
SQLite type, column by column). Other dialects keep SQLAlchemy's own path.

The batch's other statements (the log head's read and update, the single-use tokens spent, the
Merkle frontier's nodes) go through the driver too (:func:`execute`, :func:`insert_new`,
:func:`select_in`): SQLAlchemy's execution path cost more than SQLite's own work on them
(measured: 0.18 of 0.53 s for 153 batches of 8, against 0.03 in SQLite). All of them run on
the driver's own cursor (:func:`run`), in the connection's transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Connection, Executable, Insert, Table
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError

from broker.store.tables import UTCDateTime, sqlite_utc_text

Processor = Callable[[Any], Any] | None


@dataclass(frozen=True, slots=True)
class Processed:
    """One row of ``table``: its column names and their values as the driver takes them."""

    table: Table
    keys: tuple[str, ...]
    values: tuple[Any, ...]


# NOTE: keyed by the tables and statements themselves, not their id(): a key holds its object,
# so no other object can come to have its id while the entry is there.
_shapes: dict[tuple[Table, str, tuple[str, ...]], tuple[str, list[Processor]]] = {}
_statements: dict[tuple[Executable, str], tuple[str, tuple[str, ...], dict[str, Any]]] = {}
_texts: dict[tuple[Any, ...], str] = {}
_lock = threading.Lock()
CHUNK_ROWS = 100
"""Rows per statement of :func:`insert_new` and :func:`select_in` (SQLite's limit on a
statement's parameters is 32,766 since 3.32; 999 before)."""


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
        run(conn, sql, values, many=True)


def insert_tuples(
    conn: Connection, table: Table, keys: tuple[str, ...], rows: Sequence[tuple[Any, ...]]
) -> None:
    """Insert ``rows``, values of ``keys`` in that order as the driver takes them, into
    ``table`` (SQLite)."""
    run(conn, _shape(conn.dialect, table, keys)[0], rows, many=True)


def run(
    conn: Connection, sql: str, params: Sequence[Any], *, many: bool = False
) -> list[tuple[Any, ...]]:
    """``sql`` (with ``params``, or each of them when ``many``) on the driver's own cursor, in
    ``conn``'s transaction; the rows it returns. A driver error is raised as SQLAlchemy raises
    it from any other statement (its parameters hidden).

    NOTE: not ``exec_driver_sql``: SQLAlchemy builds a result's column metadata at every
    textual statement that returns rows (``_merge_cols_by_none``, the largest Python cost of a
    batch after the statements themselves, profiled)."""
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        if many:
            cursor.executemany(sql, params)
        else:
            cursor.execute(sql, params)
        return list(cursor.fetchall())
    except dbapi.Error as exc:
        raise DBAPIError.instance(
            sql, params, exc, dbapi.Error, hide_parameters=True, dialect=conn.dialect
        ) from exc
    finally:
        cursor.close()


def execute(
    conn: Connection, statement: Executable, params: Mapping[str, Any] | None = None
) -> list[Any]:
    """The rows of ``statement`` with ``params`` (its parameters' values by name; the others
    keep the values the statement holds), through the driver where :func:`raw_rows`, else
    SQLAlchemy's execute. For statements whose parameters need no bind processing (ValueError
    else)."""
    if not raw_rows(conn.dialect):
        result = conn.execute(statement, dict(params or {}))
        return list(result.all()) if result.returns_rows else []
    sql, names, defaults = _compiled(conn.dialect, statement)
    given = params or {}
    return run(conn, sql, tuple(given.get(n, defaults[n]) for n in names))


def insert_new(
    conn: Connection, table: Table, rows: Sequence[Processed], returning: Sequence[str]
) -> list[tuple[Any, ...]]:
    """Insert rows :func:`process` made for ``conn``'s dialect (SQLite), skipping those whose
    key is taken (``ON CONFLICT DO NOTHING``); return the ``returning`` columns of the ones
    inserted (tuples, in that order), in no particular order."""
    found: list[tuple[Any, ...]] = []
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[start : start + CHUNK_ROWS]
        keys = chunk[0].keys
        if any(r.table is not table or r.keys != keys for r in chunk):
            raise ValueError(f"rows of another table or other columns for {table.name}")
        key = ("insert_new", table, conn.dialect.name, keys, len(chunk), tuple(returning))

        def build(count: int = len(chunk), keys: tuple[str, ...] = keys) -> str:
            quote = conn.dialect.identifier_preparer
            # Names from the table's metadata, quoted by the dialect; every value a parameter.
            return (
                f"INSERT INTO {quote.format_table(table)} ({_names(conn.dialect, table, keys)}) "  # noqa: S608
                f"VALUES {_rows_of_marks(len(keys), count)} "
                f"ON CONFLICT DO NOTHING RETURNING {_names(conn.dialect, table, returning)}"
            )

        found.extend(run(conn, _text(key, build), tuple(v for r in chunk for v in r.values)))
    return found


def select_in(
    conn: Connection,
    table: Table,
    columns: Sequence[str],
    keys: Sequence[str],
    wanted: Sequence[tuple[Any, ...]],
) -> list[tuple[Any, ...]]:
    """``columns`` of the rows of ``table`` (tuples, in that order) whose ``keys`` are one of
    ``wanted`` (SQLite; values that need no bind processing), in no particular order."""
    found: list[tuple[Any, ...]] = []
    for start in range(0, len(wanted), CHUNK_ROWS):
        chunk = wanted[start : start + CHUNK_ROWS]
        key = ("select_in", table, conn.dialect.name, tuple(columns), tuple(keys), len(chunk))

        def build(count: int = len(chunk)) -> str:
            quote = conn.dialect.identifier_preparer
            # Names from the table's metadata, quoted by the dialect; every value a parameter.
            return (
                f"SELECT {_names(conn.dialect, table, columns)} "  # noqa: S608
                f"FROM {quote.format_table(table)} WHERE ({_names(conn.dialect, table, keys)}) "
                f"IN (VALUES {_rows_of_marks(len(keys), count)})"
            )

        found.extend(run(conn, _text(key, build), tuple(v for t in chunk for v in t)))
    return found


def _text(key: tuple[Any, ...], build: Callable[[], str]) -> str:
    """The statement cached under ``key``, built by ``build`` the first time."""
    sql = _texts.get(key)
    if sql is None:
        sql = build()
        with _lock:
            _texts[key] = sql
    return sql


def _names(dialect: Dialect, table: Table, columns: Sequence[str]) -> str:
    """``columns`` of ``table``, quoted by ``dialect``, comma-separated."""
    quote = dialect.identifier_preparer
    return ", ".join(quote.format_column(table.c[c]) for c in columns)


def _rows_of_marks(width: int, count: int) -> str:
    """``(?, ?), (?, ?)``: ``count`` rows of ``width`` parameters."""
    return ", ".join(["(" + ", ".join("?" * width) + ")"] * count)


def _compiled(
    dialect: Dialect, statement: Executable
) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """``statement`` compiled once for the driver: its SQL, its parameters' names in order,
    and the values it holds for them."""
    cache_key = (statement, dialect.name)
    found = _statements.get(cache_key)
    if found is not None:
        return found
    compiled = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    names = tuple(compiled.positiontup or ())
    for name in names:
        bind = compiled.binds[name]
        if bind.expanding or bind.type.dialect_impl(dialect).bind_processor(dialect) is not None:
            raise ValueError(f"parameter {name} of {statement} needs processing first")
    result = (compiled.string, names, {n: compiled.binds[n].value for n in names})
    with _lock:
        _statements[cache_key] = result
    return result


def _processor(dialect: Dialect, column: Column[Any]) -> Processor:
    """``column``'s bind processor for ``dialect``: SQLAlchemy's, but for a UTC timestamp on
    SQLite, where one function does what its two do (:func:`tables.sqlite_utc_text`)."""
    # NOTE: the type itself, not a subclass, which could process its values otherwise.
    if dialect.name == "sqlite" and type(column.type) is UTCDateTime:
        return sqlite_utc_text
    processor: Processor = column.type.dialect_impl(dialect).bind_processor(dialect)
    return processor


def _shape(dialect: Dialect, table: Table, keys: tuple[str, ...]) -> tuple[str, list[Processor]]:
    """The INSERT of ``keys`` into ``table`` for the driver, and each column's processor."""
    cache_key = (table, dialect.name, keys)
    with _lock:
        found = _shapes.get(cache_key)
    if found is not None:
        return found
    quote = dialect.identifier_preparer
    # Names from the table's metadata, quoted by the dialect; every value is a parameter.
    sql = (
        f"INSERT INTO {quote.format_table(table)} ({_names(dialect, table, keys)}) "  # noqa: S608
        f"VALUES {_rows_of_marks(len(keys), 1)}"
    )
    processors = [_processor(dialect, table.c[key]) for key in keys]
    with _lock:
        _shapes[cache_key] = (sql, processors)
    return sql, processors
