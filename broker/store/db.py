"""Database engine and transactions. SQLite file by default; any SQLAlchemy URL (PostgreSQL) works.

Write transactions map every database failure to :class:`AuditUnavailable`: the caller learns that
nothing was recorded, so nothing may be issued.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from broker.errors import AuditUnavailable
from broker.store.files import create_owner_only, owner_only
from broker.store.loop_commit import LOCK_POLL_FOR_S, LOCK_POLL_MAX_S, LOCK_POLL_S, LoopCommit

log = logging.getLogger("broker.store")
MIGRATIONS = Path(__file__).parent / "migrations"
HEAD_REVISION = "0010"
"""The newest migration (a test checks it against Alembic's head). A database already at it
is opened without importing Alembic, which would cost the server ~11 MB for nothing."""
SqliteSync = Literal["FULL", "NORMAL"]
BUSY_TIMEOUT_S = 10
"""How long a writer waits for the write lock (this process's, then SQLite's) before failing."""
WAL_SIZE_LIMIT = 4 * 1024 * 1024
"""Bytes of ``-wal`` file SQLite keeps after a checkpoint reset it (``journal_size_limit``);
the default, -1, keeps the file at its largest size ever."""
MIGRATION_LOCK = 0x62726F6B  # "brok"
"""The PostgreSQL advisory lock that replicas starting together migrate under, one at a time."""
CHECKPOINT_BUSY_MS = 250
"""How long a WAL truncation waits for readers to leave the log. Writers of this process wait
meanwhile, so it is short: a truncation that cannot finish is tried again next round."""


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'broker.db').resolve()}"


def _secure_sqlite_files(database: str | None) -> None:
    """The database file and its ``-wal`` and ``-shm`` are 0600 whatever the umask.

    NOTE: SQLite creates files 0644 (less the umask), yet the database holds the audit log, the
    grants and the spent token ids. Creating the file 0600 first is enough for the others:
    SQLite gives a new ``-wal`` and ``-shm`` the database file's own mode. Ones left by an
    earlier version are tightened here.
    """
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    create_owner_only(path)
    for suffix in ("-wal", "-shm", "-journal"):
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists():
            owner_only(sidecar, 0o600)


def _writer_lock_file(database: str | None) -> int | None:
    """An open descriptor of ``<database>-writer.lock`` (0600), or None for an in-memory one.

    NOTE: processes sharing one SQLite file (``--workers``) queue for its write lock here, on
    a lock file, rather than in SQLite's busy handler, which sleeps up to 100 ms between tries
    and so gave a second worker p99s of over a second (docs/performance.md)."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database).with_name(Path(database).name + "-writer.lock")
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _lock_file(fd: int, deadline: float) -> None:
    """Take the writer lock file, trying again every 100 µs for 20 ms, then backing off to 2 ms,
    until ``deadline``. Raises AuditUnavailable then.

    NOTE: another worker's group commit holds the lock for a few ms; waking soon after it ends
    matters more than the system calls of a wait that short (backing off from the first try
    cost two workers ~8 % of their exchanges/s, docs/performance.md). A blocking flock would
    wake at once but cannot keep the deadline."""
    started = time.monotonic()
    pause = LOCK_POLL_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            now = time.monotonic()
            if now > deadline:
                raise AuditUnavailable(
                    "the store is busy (another process held its write lock); nothing was issued"
                ) from None
            if now - started > LOCK_POLL_FOR_S:
                pause = min(pause * 2, LOCK_POLL_MAX_S)
            time.sleep(pause)


def _sqlite_setup(engine: Engine, synchronous: SqliteSync) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below own transaction control (pysqlite's own is broken).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # NOTE: FULL fsyncs every commit, so an acknowledged exchange survives power loss.
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front: concurrent writers queue on busy_timeout
        # instead of failing when a read snapshot cannot be upgraded.
        mode = "DEFERRED" if conn.get_execution_options().get("readonly") else "IMMEDIATE"
        conn.exec_driver_sql(f"BEGIN {mode}")


def _unavailable(exc: SQLAlchemyError) -> AuditUnavailable:
    cause = type(getattr(exc, "orig", None) or exc).__name__
    return AuditUnavailable(f"the store could not record the event ({cause}); nothing was issued")


@contextmanager
def _fail_closed() -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise _unavailable(exc) from exc


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
            _secure_sqlite_files(self.engine.url.database)
            _sqlite_setup(self.engine, sqlite_synchronous)
        self._writer = sessionmaker(self.engine, expire_on_commit=False)
        self._reader = sessionmaker(
            self.engine.execution_options(readonly=True), expire_on_commit=False
        )
        # SQLite has one writer at a time. Threads of this process queue on a lock here instead
        # of polling in SQLite's busy handler (which sleeps up to 100 ms between tries); other
        # processes still meet BEGIN IMMEDIATE and busy_timeout. PostgreSQL needs no lock: its
        # row lock on log_head serialises appenders, and other writes may run in parallel.
        self._write_lock = threading.Lock() if is_sqlite else None
        self._writer_file = _writer_lock_file(self.engine.url.database) if is_sqlite else None
        self._is_sqlite = is_sqlite

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision.

        NOTE: replicas (or ``--workers``) that start together must not migrate at once. On
        PostgreSQL the migration waits for an advisory lock held to the end of its transaction;
        SQLite's write transaction (``BEGIN IMMEDIATE``) already admits one migrator. Either
        way Alembic reads the revision after the wait, so the later ones find nothing to do."""
        if self.revision() == HEAD_REVISION:
            return
        from alembic import command  # noqa: PLC0415 (see HEAD_REVISION)
        from alembic.config import Config  # noqa: PLC0415

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            if not self._is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def revision(self) -> str | None:
        """The schema's Alembic revision, or None when Alembic never ran here."""
        with self.engine.execution_options(readonly=True).connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            found = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            return None if found is None else str(found)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success; every database failure (including a constraint
        a caller did not catch itself) becomes AuditUnavailable, so nothing is issued. On SQLite
        the transactions of this process run one at a time (not nested: a write inside a write
        times out with AuditUnavailable)."""
        with self._one_writer(), _fail_closed(), self._writer() as session, session.begin():
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """:meth:`write` as a SQLAlchemy Core connection, without an ORM session: for the hot
        paths that write prebuilt statements. The same guarantees and errors."""
        with self._one_writer(), _fail_closed(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _one_writer(self) -> Iterator[None]:
        lock = self._write_lock
        if lock is None:
            yield
            return
        if not lock.acquire(timeout=BUSY_TIMEOUT_S):
            raise AuditUnavailable("the store is busy (write lock timeout); nothing was issued")
        try:
            if self._writer_file is None:
                yield
                return
            _lock_file(self._writer_file, time.monotonic() + BUSY_TIMEOUT_S)
            try:
                yield
            finally:
                fcntl.flock(self._writer_file, fcntl.LOCK_UN)
        finally:
            lock.release()

    @property
    def single_writer(self) -> bool:
        """Whether writes take turns on this store's locks (SQLite), see :meth:`try_writer`."""
        return self._write_lock is not None

    def try_writer(self) -> bool:
        """Take the writer locks :meth:`write` waits for (this process's, then the other
        processes' lock file) if both are free now; True when taken. Never waits: for the
        event loop's group commit (:mod:`broker.store.loop_commit`), which tries again later.
        Whoever took them gives them back with :meth:`release_writer`, from any thread."""
        lock = self._write_lock
        if lock is None:
            return True
        if not lock.acquire(blocking=False):
            return False
        if self._writer_file is not None:
            try:
                fcntl.flock(self._writer_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.release()
                return False
            except BaseException:  # e.g. ENOLCK: never keep this process's lock
                lock.release()
                raise
        return True

    def release_writer(self) -> None:
        """Give back the locks :meth:`try_writer` took."""
        if self._write_lock is None:
            return
        if self._writer_file is not None:
            fcntl.flock(self._writer_file, fcntl.LOCK_UN)
        self._write_lock.release()

    def probe_write(self) -> str | None:
        """None when a write transaction can commit now; else why not (``the store cannot
        write (OperationalError: database or disk is full)``). For readiness: cheap, one tiny
        commit. Never raises.

        NOTE: a transaction that rolls back proves little: SQLite writes nothing to disk for
        it, so it succeeds on a full disk. On SQLite this commits a rewrite of the database
        header's ``user_version`` (unused by the broker and by Alembic) with its own value:
        one WAL frame and one fsync, and it fails exactly when an exchange's commit would need
        new space. On PostgreSQL it checks that the session may write (not a read-only
        standby); disk space is for the database server's own monitoring.
        """
        try:
            with self.transaction() as conn:
                if self._is_sqlite:
                    version = int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)
                    conn.exec_driver_sql(f"PRAGMA user_version = {version}")
                elif conn.exec_driver_sql("SHOW transaction_read_only").scalar() != "off":
                    return "the store is read-only (a standby database?)"
        except AuditUnavailable as exc:
            cause = getattr(exc.__cause__, "orig", None) or exc.__cause__
            if cause is None:  # this process's write lock timed out: the description says so
                return exc.description
            said = str(cause).strip().splitlines()
            return (
                f"the store cannot write ({type(cause).__name__}: {said[0][:200] if said else ''})"
            )
        return None

    def truncate_wal(self) -> bool:
        """Copy SQLite's write-ahead log into the database and truncate the ``-wal`` file to
        zero bytes. True when it did (or there is no WAL: PostgreSQL); False when a reader
        kept it from finishing within :data:`CHECKPOINT_BUSY_MS`: the next round retries.

        NOTE: SQLite checkpoints on its own (``wal_autocheckpoint``), but those checkpoints
        never shrink the file, and a reader holding an old snapshot (a long ``broker audit
        verify``) makes them stop short, so the file grows. Raises AuditUnavailable.
        """
        if not self._is_sqlite:
            return True
        with self._one_writer(), _fail_closed():
            raw = self.engine.raw_connection()
            try:
                cur = raw.cursor()
                cur.execute(f"PRAGMA busy_timeout={CHECKPOINT_BUSY_MS}")
                try:
                    busy, _log_frames, _done = cur.execute(
                        "PRAGMA wal_checkpoint(TRUNCATE)"
                    ).fetchone()
                finally:
                    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
                    cur.close()
            except sqlite3.Error as exc:
                raise AuditUnavailable(f"the store is unavailable ({type(exc).__name__})") from exc
            finally:
                raw.close()
        return bool(busy == 0)

    @contextmanager
    def read(self) -> Iterator[Session]:
        try:
            with self._reader() as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            raise AuditUnavailable(f"the store is unavailable ({type(exc).__name__})") from exc

    def close(self) -> None:
        self.engine.dispose()
        if self._writer_file is not None:
            os.close(self._writer_file)
            self._writer_file = None


T = TypeVar("T")
R = TypeVar("R")
Outcomes = list[Exception | None]
WriteBatch = Callable[[Connection, Sequence[T]], tuple[Outcomes, Callable[[], None] | None]]
"""Writes a batch of items in one open transaction. Returns, per item, None (written) or the
error for that item alone (nothing of it written), and what to run once the batch committed.
Raising fails the whole batch."""
Done = Callable[[Exception | None], None]
"""Called once an item's batch ended: with None when the item committed, else its error."""
Steps = Generator[T, None, R]
"""Work that needs group commits along the way: it yields each item to be written and is resumed
once that item's batch ended, with nothing when the item committed and with its error thrown in
when not; what it returns is its result. Whoever runs it chooses how to wait for the commits:
:meth:`GroupCommit.drive` blocks a thread, the API awaits them on its event loop."""


@dataclass(frozen=True, slots=True)
class Finished(Generic[R]):
    """What :func:`advance` returns once the steps are done."""

    value: R


class OffLoop:
    """What steps yield (:data:`OFF_LOOP`) before work that may block (a network call, a lock,
    a transaction of its own): whoever runs them on an event loop resumes them in a thread;
    in a thread they just go on."""

    __slots__ = ()


OFF_LOOP = OffLoop()


def advance(
    steps: Steps[T | OffLoop, R], error: Exception | None = None
) -> T | OffLoop | Finished[R]:
    """Run ``steps`` to its next item (first call: ``error`` None), resuming it with the last
    item's outcome: ``error`` is thrown in. Returns the next item (or OFF_LOOP), or Finished
    with the result; the steps' own errors propagate."""
    try:
        return steps.send(None) if error is None else steps.throw(error)
    except StopIteration as stop:
        return Finished(stop.value)


def advance_in_thread(
    steps: Steps[T | OffLoop, R], error: Exception | None = None
) -> T | Finished[R]:
    """:func:`advance` for a thread, where blocking is allowed: past every OFF_LOOP."""
    step = advance(steps, error)
    while isinstance(step, OffLoop):
        step = advance(steps)
    return step


@dataclass(eq=False, slots=True)
class _Waiting(Generic[T]):
    item: T
    done: Done


class GroupCommit(Generic[T]):
    """Group commit: one writer thread writes the items of every waiting caller in one write
    transaction and commits once, so many exchanges share a BEGIN, a COMMIT, an fsync and one
    multi-row statement per table.

    A caller learns of its item's outcome only after the transaction holding it committed.
    NOTE: fail closed: when the batch cannot be written or committed, every caller in it gets
    AuditUnavailable, whatever its own outcome was; an item that ``write`` refuses on its own
    (a replayed token) fails only its caller.
    """

    def __init__(self, store: Store, write: WriteBatch[T], *, max_batch: int = 256) -> None:
        self._store = store
        self._write = write
        self._max_batch = max_batch
        self._queue: list[_Waiting[T]] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._on_loop: LoopCommit[T] | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> bool:
        """On SQLite, write the batches on ``loop`` from now on and commit them in a thread
        (:mod:`broker.store.loop_commit`); True then. Call it on the loop. Elsewhere nothing
        changes (False): on PostgreSQL a statement waits for the network and for other
        replicas' row locks, which must not stop the loop."""
        if self._on_loop is None and self._store.single_writer:
            self._on_loop = LoopCommit(
                self._store,
                self._write,
                loop,
                max_batch=self._max_batch,
                busy_timeout=BUSY_TIMEOUT_S,
            )
        return self._on_loop is not None

    @property
    def on_loop(self) -> bool:
        """Whether the batches are written on an event loop (see :meth:`attach`)."""
        return self._on_loop is not None

    async def detach(self) -> None:
        """Back to the writer thread: the loop's batch under way ends first, and what the loop
        still had queued goes to the thread. Call it on the loop, before its exchange threads
        are shut down (they may be waiting for a commit)."""
        on_loop = self._on_loop
        if on_loop is not None:
            await on_loop.close(self._to_thread)
            self._on_loop = None

    def submit(self, item: T, done: Done) -> None:
        """Queue ``item`` for the next group commit; ``done`` is called with its outcome (see
        :data:`Done`) once its batch ended: in the writer thread, or on the loop when attached.
        Raises AuditUnavailable (and never calls ``done``) when the writer has been closed."""
        on_loop = self._on_loop
        if on_loop is not None and on_loop.submit(item, done):
            return
        self._to_thread(item, done)

    def _to_thread(self, item: T, done: Done) -> None:
        with self._wake:
            if self._closed:
                raise AuditUnavailable("the broker is shutting down; nothing was issued")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._writer, name="broker-group-commit", daemon=True
                )
                self._thread.start()
            self._queue.append(_Waiting(item, done))
            self._wake.notify()

    def run(self, item: T) -> None:
        """Write ``item`` in the next group commit and wait until it committed. Raises the
        item's own error, or AuditUnavailable when its batch did not commit. Not on the loop
        the batches are written on (it would wait for itself): RuntimeError there."""
        on_loop = self._on_loop
        if on_loop is not None and on_loop.on_loop():
            raise RuntimeError("GroupCommit.run() on the loop that writes the batches")
        ended = threading.Event()
        outcome: list[Exception | None] = []

        def done(error: Exception | None) -> None:
            outcome.append(error)
            ended.set()

        self.submit(item, done)
        ended.wait()
        if outcome[0] is not None:
            raise outcome[0]

    def drive(self, steps: Steps[T | OffLoop, R]) -> R:
        """Run ``steps`` in this thread, waiting here for each of its group commits."""
        step = advance_in_thread(steps)
        while not isinstance(step, Finished):
            try:
                self.run(step)
            except Exception as exc:  # the item's outcome: the steps handle it
                step = advance_in_thread(steps, exc)
            else:
                step = advance_in_thread(steps)
        return step.value

    def close(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=BUSY_TIMEOUT_S * 2)

    def _writer(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
            outcomes: Outcomes
            try:
                outcomes = self._commit(batch)
            except AuditUnavailable as exc:
                outcomes = [AuditUnavailable(exc.description) for _ in batch]
            except Exception:  # a bug: still nobody may rely on this batch
                log.exception("group commit failed")
                outcomes = [AuditUnavailable("the store failed; nothing was issued") for _ in batch]
            # NOTE: whatever ended the batch, a caller learns of success only after its commit.
            for waiting, error in zip(batch, outcomes, strict=True):
                try:
                    waiting.done(error)
                except Exception:  # one caller's bug must not keep the others waiting
                    log.exception("a group-commit caller failed to take its outcome")

    def _commit(self, batch: list[_Waiting[T]]) -> Outcomes:
        with self._store.transaction() as conn:
            outcomes, after_commit = self._write(conn, [w.item for w in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError("the batch writer returned a wrong number of outcomes")
        if after_commit is not None:
            after_commit()
        return outcomes
