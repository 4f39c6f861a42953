"""Database engine and transactions. SQLite file by default; any SQLAlchemy URL (PostgreSQL) works.

Write transactions map every database failure to :class:`AuditUnavailable`: the caller learns that
nothing was recorded, so nothing may be issued.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from broker.errors import AuditUnavailable

MIGRATIONS = Path(__file__).parent / "migrations"
SqliteSync = Literal["FULL", "NORMAL"]


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'broker.db').resolve()}"


def _sqlite_setup(engine: Engine, synchronous: SqliteSync) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below own transaction control (pysqlite's own is broken).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # NOTE: FULL fsyncs every commit, so an acknowledged exchange survives power loss.
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front: concurrent writers queue on busy_timeout
        # instead of failing when a read snapshot cannot be upgraded.
        mode = "DEFERRED" if conn.get_execution_options().get("readonly") else "IMMEDIATE"
        conn.exec_driver_sql(f"BEGIN {mode}")


class Store:
    """Owns the engine; hands out write and read transactions."""

    def __init__(self, url: str, *, sqlite_synchronous: SqliteSync = "FULL") -> None:
        self.url = url
        is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False}
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_pre_ping=True)
        self.engine = create_engine(url, **kwargs)
        if is_sqlite:
            _sqlite_setup(self.engine, sqlite_synchronous)
        self._writer = sessionmaker(self.engine, expire_on_commit=False)
        self._reader = sessionmaker(
            self.engine.execution_options(readonly=True), expire_on_commit=False
        )

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success; every database failure (including a constraint
        a caller did not catch itself) becomes AuditUnavailable, so nothing is issued."""
        try:
            with self._writer() as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            cause = type(getattr(exc, "orig", None) or exc).__name__
            raise AuditUnavailable(
                f"the store could not record the event ({cause}); nothing was issued"
            ) from exc

    @contextmanager
    def read(self) -> Iterator[Session]:
        try:
            with self._reader() as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise AuditUnavailable(f"the store is unavailable ({type(exc).__name__})") from exc

    def close(self) -> None:
        self.engine.dispose()
