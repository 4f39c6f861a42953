"""The group commit on the event loop, for SQLite: the loop writes each batch, a thread commits.

:class:`~broker.store.db.GroupCommit` normally writes its batches in a thread of its own. On
SQLite, the API hands them to this instead (:meth:`GroupCommit.attach`): the event loop, which
runs an exchange's steps itself there (see ``broker.api.token.exchange``), also runs a batch's
statements, and a committer thread runs only the ``COMMIT`` (its fsync) and gives the locks back.

NOTE: why (docs/performance.md, "One thread for the hot path"): in a process whose threads all
want the GIL (the loop, up to 40 exchange threads, the writer), a writer thread gets it back
after each SQLite call only when the others let go, and it does so while holding the store's
write lock, which the other workers of ``broker serve --workers`` queue for: a batch of 32 took
9 ms alone and 83 ms beside three busy threads (measured). Here the Python work of an exchange
and of its batch runs in one thread, so nothing waits for the GIL while holding a lock but the
committer, once per batch. The loop never blocks on a lock: it tries the writer locks
(``Store.try_writer``) and, when another process holds them, tries again after a pause (every
100 µs for 20 ms, then every 2 ms), failing the batch closed after ``BUSY_TIMEOUT_S``.

The loop lowers the interpreter's switch interval (``sys.setswitchinterval``) from 5 ms to
SWITCH_S while it is attached, and restores it when detached: after its fsync the committer
needs the GIL back to give the locks up, and a busy loop lets go of it only when the interval
is up (measured: 5.2 ms at 5 ms, 0.65 ms at 0.5 ms), so every batch held the write lock 5 ms
longer than its commit. Threads contend for the GIL rarely here (the loop does the work), so
the shorter interval costs the loop next to nothing.

Fail closed as in the thread: a batch whose statements or commit fail answers every caller in it
with AuditUnavailable; a caller learns of success only after its batch committed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from broker.errors import AuditUnavailable

if TYPE_CHECKING:
    from broker.store.db import Store

log = logging.getLogger(__name__)

T = TypeVar("T")
Outcomes = list[Exception | None]
After = Callable[[], None] | None
WriteBatch = Callable[[Connection, Sequence[T]], tuple[Outcomes, After]]
Done = Callable[[Exception | None], None]

_Job = tuple[Any, list[tuple[T, Done]], Outcomes, After]
"""A written batch for the committer: its transaction, callers, outcomes, what follows."""

SWITCH_S = 0.0005
"""The switch interval while a loop writes the batches (see the module's docstring)."""

LOCK_POLL_S = 0.0001
"""How often a writer waiting for another process's write lock tries again (here, and in
``broker.store.db`` for the threads), for LOCK_POLL_FOR_S; then every LOCK_POLL_MAX_S."""
LOCK_POLL_FOR_S = 0.02
LOCK_POLL_MAX_S = 0.002


class LoopCommit(Generic[T]):
    """Group commits of items submitted on (or handed to) one event loop."""

    def __init__(
        self,
        store: Store,
        write: WriteBatch[T],
        loop: asyncio.AbstractEventLoop,
        *,
        max_batch: int,
        busy_timeout: float,
    ) -> None:
        self._store = store
        self._write = write
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._max_batch = max_batch
        self._busy_timeout = busy_timeout
        self._queue: list[tuple[T, Done]] = []
        self._busy = False  # a batch is being written or committed, or the locks are tried
        self._waiting_since: float | None = None
        self._open = True
        self._fallback: Callable[[T, Done], None] | None = None
        self._jobs: queue.SimpleQueue[_Job[T] | None] = queue.SimpleQueue()
        self._committer = threading.Thread(
            target=self._commit_loop, name="broker-committer", daemon=True
        )
        # NOTE: one connection for every batch, checked out here: a pool checkout on the loop
        # could wait for the readers' connections while holding the write locks.
        self._conn = store.engine.connect()
        self._committer.start()
        _short_switch(+1)

    def on_loop(self) -> bool:
        """Whether the caller runs on this loop's thread (and so may be answered directly)."""
        return threading.get_ident() == self._loop_thread

    def submit(self, item: T, done: Done) -> bool:
        """Queue ``item``; ``done`` is called on the loop with its outcome once its batch ended.
        False (nothing queued) once :meth:`close` began: the caller uses the writer thread."""
        if not self._open:
            return False
        if self.on_loop():
            self._queued(item, done)
            return True
        try:
            self._loop.call_soon_threadsafe(self._queued, item, done)
        except RuntimeError:  # the loop is closed (stopped without detaching): the thread
            return False
        return True

    async def close(self, fallback: Callable[[T, Done], None]) -> None:
        """Stop taking items (later ones go to ``fallback``, the writer thread), let the batch
        under way end, hand what is still queued to ``fallback``, stop the committer."""
        self._fallback = fallback
        self._open = False
        while self._busy:
            await asyncio.sleep(0.001)
        queued, self._queue = self._queue, []
        for item, done in queued:
            fallback(item, done)
        self._jobs.put(None)
        await asyncio.to_thread(self._committer.join, self._busy_timeout * 2)
        _close(self._conn)
        _short_switch(-1)

    # --- on the loop ---------------------------------------------------------------------------

    def _queued(self, item: T, done: Done) -> None:
        if self._fallback is not None and not self._busy:
            try:
                self._fallback(item, done)  # closing: the writer thread takes it
            except Exception as exc:  # the writer thread is closed too
                done(_failure(exc))
            return
        self._queue.append((item, done))
        if not self._busy:
            self._busy = True
            self._loop.call_soon(self._start)

    def _start(self) -> None:
        """Write the next batch once the writer locks are free (else try again shortly).
        NOTE: whatever fails here answers the batch and leaves the loop able to go on: a loop
        callback that raised would leave ``_busy`` set and nothing committed again."""
        try:
            self._try_start()
        except Exception as exc:  # a bug, or the locks failed: nobody may wait for this batch
            log.exception("group commit failed")
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            self._end(batch, [_failure(exc) for _ in batch], None)

    def _try_start(self) -> None:
        if not self._queue:
            self._busy = False
            return
        now = time.monotonic()
        if not self._store.try_writer():
            since = self._waiting_since = self._waiting_since or now
            if now - since > self._busy_timeout:
                self._waiting_since = None
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                busy = AuditUnavailable(
                    "the store is busy (another process held its write lock); nothing was issued"
                )
                self._end(batch, [busy for _ in batch], None)
                return
            pause = LOCK_POLL_S if now - since < LOCK_POLL_FOR_S else LOCK_POLL_MAX_S
            self._loop.call_later(pause, self._start)
            return
        self._waiting_since = None
        batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
        conn = self._conn
        transaction: Any = None
        try:
            transaction = conn.begin()
            outcomes, after = self._write(conn, [item for item, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError("the batch writer returned a wrong number of outcomes")
        except Exception as exc:
            _rollback(transaction)
            self._store.release_writer()
            if not isinstance(exc, SQLAlchemyError | AuditUnavailable):
                log.exception("group commit failed")
            self._end(batch, [_failure(exc) for _ in batch], None)
            return
        self._jobs.put((transaction, batch, outcomes, after))

    def _end(self, batch: list[tuple[T, Done]], outcomes: Outcomes, after: After) -> None:
        """Answer a batch's callers (after it committed, or with its failure), then go on."""
        if after is not None:
            try:
                after()
            except Exception:  # the commit stands; only a cache missed its update
                log.exception("after a group commit")
        # NOTE: whatever ended the batch, a caller learns of success only after its commit.
        for (_, done), error in zip(batch, outcomes, strict=True):
            try:
                done(error)
            except Exception:  # one caller's bug must not keep the others waiting
                log.exception("a group-commit caller failed to take its outcome")
        if self._queue:
            self._loop.call_soon(self._start)
        else:
            self._busy = False

    # --- in the committer thread ----------------------------------------------------------------

    def _commit_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            transaction, batch, outcomes, after = job
            try:
                transaction.commit()
            except Exception as exc:
                if not isinstance(exc, SQLAlchemyError):
                    log.exception("group commit failed")
                outcomes, after = [_failure(exc) for _ in batch], None
                _rollback(transaction)
            finally:
                try:
                    self._store.release_writer()
                except Exception:
                    log.exception("giving the write locks back failed")
            try:
                self._loop.call_soon_threadsafe(self._end, batch, outcomes, after)
            except RuntimeError:  # the loop is closed: nobody is waiting on it any more
                log.warning("a group commit ended after its event loop closed")


_switch_lock = threading.Lock()
_switch_users: list[float] = []  # the interval before the first attached loop, while any is


def _short_switch(change: int) -> None:
    """The first attached loop shortens the switch interval to SWITCH_S, the last one to close
    restores it (several brokers in one process: tests)."""
    with _switch_lock:
        if change > 0:
            if not _switch_users:
                before = sys.getswitchinterval()
                sys.setswitchinterval(min(before, SWITCH_S))
            else:
                before = _switch_users[0]
            _switch_users.append(before)
        elif _switch_users:
            before = _switch_users.pop()
            if not _switch_users:
                sys.setswitchinterval(before)


def _failure(exc: Exception) -> AuditUnavailable:
    """What every caller of a failed batch is told."""
    if isinstance(exc, AuditUnavailable):
        return AuditUnavailable(exc.description)
    if isinstance(exc, SQLAlchemyError):
        cause = type(getattr(exc, "orig", None) or exc).__name__
        return AuditUnavailable(
            f"the store could not record the event ({cause}); nothing was issued"
        )
    return AuditUnavailable("the store failed; nothing was issued")


def _rollback(failed: Any) -> None:
    """Roll back ``failed``, the transaction whose statements or commit failed.

    NOTE: a transaction whose COMMIT raised must be rolled back by hand, or its connection stays
    inside BEGIN IMMEDIATE, holding SQLite's write lock (SQLAlchemy's ``engine.begin()`` block
    does this for the writer thread). If even that fails, the connection is invalidated: the
    next batch begins on a new one."""
    if failed is None:
        return
    try:
        failed.rollback()
        # A COMMIT that raised before reaching the driver leaves SQLAlchemy's transaction
        # over but SQLite's open (BEGIN IMMEDIATE is ours, not the driver's): end it there.
        driver = failed.connection.connection.driver_connection
        if getattr(driver, "in_transaction", False):
            driver.rollback()
    except Exception:
        log.exception("rolling back a failed group commit failed")
        try:
            failed.connection.invalidate()
        except Exception:
            log.exception("invalidating a group-commit connection failed")


def _close(conn: Connection) -> None:
    """Close ``conn``; a failure here changes nothing."""
    try:
        conn.close()
    except Exception:
        log.exception("closing a group-commit connection failed")
