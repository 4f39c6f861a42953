"""Leases in the store: which one of several broker processes may do a thing now.

A lease is a row (``leases``: name, holder, expiry, generation). A process holds it while its
row names it and has not expired; it renews by moving the expiry on; anyone may take a lease
that expired, and taking one counts the ``generation`` up (a fencing token: work stamped with
an older generation came from a holder that has since lost it). The same code runs on SQLite
(processes of one machine) and on PostgreSQL (replicas).

NOTE: expiry is compared with the database's clock on PostgreSQL (``now()``), so replicas whose
clocks differ still agree on who holds a lease; SQLite's processes share one machine's clock.

Two uses: the broker's singleton maintenance (:data:`MAINTENANCE`, see
:mod:`broker.maintenance`) and :meth:`Leases.lock`, a mutual exclusion of a short critical
section across processes (the AWS backend's read-modify-write of one role's policy).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, Table, bindparam, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from broker.errors import BrokerError, TemporarilyUnavailable
from broker.store.db import Store
from broker.store.tables import LeaseRow

log = logging.getLogger("broker.lease")
MAINTENANCE = "maintenance"
"""The lease of the singleton maintenance jobs (:mod:`broker.maintenance`)."""
LOCK_POLL_S = 0.05


def _table() -> Table:
    table = LeaseRow.__table__
    assert isinstance(table, Table)
    return table


_LEASES = _table()
_ROW = select(_LEASES.c.holder, _LEASES.c.expires_at, _LEASES.c.generation).where(
    _LEASES.c.name == bindparam("name")
)


class LeaseLost(BrokerError):
    """This process no longer holds a lease it acted under (it expired, another took it)."""

    code = "lease_lost"
    status = 503


class LockTimeout(TemporarilyUnavailable):
    """A :meth:`Leases.lock` stayed held by another process for longer than the wait (a
    temporary failure: a backend revocation that meets it is retried)."""


@dataclass(frozen=True, slots=True)
class Held:
    """A lease this process holds: its name, the generation it took, and until when."""

    name: str
    generation: int
    expires_at: dt.datetime


def holder_id() -> str:
    """A name for this process that no other process (here or on another machine) shares:
    host, pid and a random part (a pid is reused after a restart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Leases:
    """Takes, renews, checks and releases leases in ``store`` for one ``holder``."""

    def __init__(
        self,
        store: Store,
        holder: str | None = None,
        *,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        """``clock`` replaces the database's own clock (tests); by default PostgreSQL's
        ``now()`` and, on SQLite, this machine's clock."""
        self.store = store
        self.holder = holder or holder_id()
        self._clock = clock
        self._local: dict[str, threading.Lock] = {}
        self._local_guard = threading.Lock()
        self._stopping = threading.Event()

    def stop_waiting(self) -> None:
        """From now on :meth:`lock` waits for nobody: it raises LockTimeout at once, also in
        the calls waiting now. For a stopping broker (broker.maintenance.Maintenance.close):
        a maintenance round waiting up to ROLE_LOCK_WAIT_S for a role a dead process held kept
        its worker from stopping on SIGTERM until the join's timeout."""
        self._stopping.set()

    def _now(self, conn: Connection) -> dt.datetime:
        if self._clock is not None:
            return self._clock()
        if conn.dialect.name == "postgresql":
            found = conn.execute(text("SELECT now()")).scalar_one()
            assert isinstance(found, dt.datetime)
            return found.astimezone(dt.UTC)
        return dt.datetime.now(dt.UTC)

    def acquire(self, name: str, ttl_s: float, *, holder: str | None = None) -> Held | None:
        """Take or renew the lease ``name`` for ``ttl_s`` seconds from now. Returns what is held
        (the generation counts up when the lease changes hands, or lapsed before it was
        renewed), or None while another holder's lease runs. Raises AuditUnavailable when the
        store cannot be written."""
        who = holder or self.holder
        with self.store.transaction() as conn:
            now = self._now(conn)
            expires = now + dt.timedelta(seconds=ttl_s)
            row = conn.execute(_ROW.with_for_update(), {"name": name}).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            insert(_LEASES).values(
                                name=name, holder=who, expires_at=expires, generation=1
                            )
                        )
                except IntegrityError:  # another process inserted it first: theirs
                    return None
                return Held(name, 1, expires)
            if row.holder == who and row.expires_at > now:
                generation = int(row.generation)
            elif row.expires_at <= now:
                generation = int(row.generation) + 1
            else:
                return None
            conn.execute(
                update(_LEASES)
                .where(_LEASES.c.name == name)
                .values(holder=who, expires_at=expires, generation=generation)
            )
        return Held(name, generation, expires)

    def check(self, conn: Connection, held: Held) -> None:
        """In ``conn``'s write transaction: raise :class:`LeaseLost` unless ``held`` is still
        this process's (same holder and generation, not expired). The row stays locked to the
        end of the transaction (on PostgreSQL; SQLite's writer holds the whole file), so work
        committed with it cannot race a takeover."""
        row = conn.execute(_ROW.with_for_update(), {"name": held.name}).first()
        if (
            row is None
            or row.holder != self.holder
            or int(row.generation) != held.generation
            or row.expires_at <= self._now(conn)
        ):
            raise LeaseLost(f"the {held.name} lease (generation {held.generation}) was lost")

    def holder_of(self, name: str) -> tuple[str, int] | None:
        """The current holder and generation of ``name``, or None (never taken, or expired)."""
        with self.store.read() as session:
            conn = session.connection()
            row = conn.execute(_ROW, {"name": name}).first()
            if row is None or row.expires_at <= self._now(conn):
                return None
            return str(row.holder), int(row.generation)

    def release(self, name: str, *, holder: str | None = None) -> None:
        """Give ``name`` up now if this process holds it (others may take it at once)."""
        who = holder or self.holder
        with self.store.transaction() as conn:
            conn.execute(
                update(_LEASES)
                .where(_LEASES.c.name == name, _LEASES.c.holder == who)
                .values(expires_at=self._now(conn))
            )

    @contextmanager
    def lock(self, name: str, *, ttl_s: float, wait_s: float) -> Iterator[None]:
        """Hold ``name`` for the ``with`` block: exclusive across every process sharing the
        store (and the threads of this one). Waits up to ``wait_s`` for another holder, then
        raises :class:`LockTimeout`. The lease lapses after ``ttl_s`` if this process dies
        holding it, so ``ttl_s`` must exceed the longest the block can take.

        NOTE: each acquisition has a holder id of its own, so that a lease left by an earlier
        block of this process (released, or lapsed) is never mistaken for this one's."""
        with self._local_guard:
            local = self._local.setdefault(name, threading.Lock())
        deadline = time.monotonic() + wait_s
        while not local.acquire(timeout=min(LOCK_POLL_S, max(0.0, deadline - time.monotonic()))):
            self._check_waiting(name)
            if time.monotonic() > deadline:
                raise LockTimeout(f"{name} is busy in this process; try again")
        try:
            who = f"{self.holder}:{secrets.token_hex(4)}"
            while self.acquire(name, ttl_s, holder=who) is None:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{name} is held by another broker process; try again")
                self._stopping.wait(LOCK_POLL_S)
                self._check_waiting(name)
            try:
                yield
            finally:
                try:
                    self.release(name, holder=who)
                except BrokerError as exc:  # it lapses after ttl_s instead
                    log.warning("could not release %s: %s", name, exc.description)
        finally:
            local.release()

    def _check_waiting(self, name: str) -> None:
        if self._stopping.is_set():
            raise LockTimeout(f"{name}: the broker is stopping; try again")
