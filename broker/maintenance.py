"""The maintenance loop: each broker process's own housekeeping, and the singleton jobs that
run on one process at a time, the holder of the ``maintenance`` lease (:mod:`broker.store.lease`).

Singletons (only the lease holder): the expiry sweep of grants and approvals, forgetting spent
token ids, settling grants stuck ``issuing``, backend revocation retries, the reconciler and the
AWS prune, checkpoint signing and publication. They change shared state, so one process doing
them is enough, and two doing them at once would only contend (or, for IAM's unconditional
writes, lose entries: those also take a lock per role, see :func:`role_lock`).

Per process (every replica, every worker): writing the summaries of its own refusal budget,
holding the store against the anchor in its own data dir (and moving that anchor on to the
newest checkpoint the store holds), its own state watch (a cache of verdicts that its own
exchanges and introspection read), refreshing its view of the publication backlog, and
truncating SQLite's WAL.

Takeover: every process wakes every :func:`tick` seconds (a third of the lease's TTL at most)
and takes or renews the lease, in a thread of its own, so a long round does not let it lapse.
A holder that dies stops renewing; its lease lapses within ``lease_ttl`` seconds and another
process takes it at its next tick, so the singletons move within ``lease_ttl + tick`` seconds
(40 s with the defaults), and the new holder runs a round at once. A graceful stop releases the
lease for the next tick to take.

NOTE: a holder renews before each singleton step and stops the round when that fails, and it
signs a checkpoint only in a transaction that finds its lease still its own (the lease row stays
locked until that commit), so a holder that was paused past its lease cannot sign over a round
that another holder has since begun.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from broker.audit.log import AuditIntegrityError
from broker.store.lease import MAINTENANCE, Held, LeaseLost, Leases

if TYPE_CHECKING:
    from broker.runtime import Broker

log = logging.getLogger("broker.maintenance")
STUCK_ISSUING_S = 60
"""An ``issuing`` grant older than this is left over from a crash, not still committing."""
STUCK_ROUND_TTLS = 10
"""A round longer than this many lease TTLs (300 s with the defaults) is stuck: its process
stops renewing the lease."""
ROLE_LOCK_TTL_S = 120.0
"""How long a role's lock outlives a broker that died holding it. Longer than the IAM calls of
one read-modify-write can take (three calls, each up to 15 s with three attempts)."""
ROLE_LOCK_WAIT_S = 30.0
"""How long a revocation waits for another process's write to the same role, then fails (and is
retried: a temporary failure)."""


def tick(checkpoint_interval: float, lease_ttl: float) -> float:
    """Seconds between the loop's wake-ups: often enough to renew the lease thrice per TTL."""
    return min(checkpoint_interval, lease_ttl / 3)


def role_lock(leases: Leases) -> Callable[[str], AbstractContextManager[None]]:
    """The AWS backend's ``role_lock``: one read-modify-write of a role's revocation policy at
    a time across every broker process sharing the store."""

    def lock(role_arn: str) -> AbstractContextManager[None]:
        return leases.lock(f"aws-role:{role_arn}", ttl_s=ROLE_LOCK_TTL_S, wait_s=ROLE_LOCK_WAIT_S)

    return lock


class Maintenance:
    """Rounds of maintenance for one broker process (see the module's docstring)."""

    def __init__(self, broker: Broker, leases: Leases) -> None:
        self._broker = broker
        self.leases = leases
        self.held: Held | None = None
        """The maintenance lease as of its last renewal (None: another process's)."""
        self._last_reconcile: float | None = None
        self._holding = threading.Lock()
        self._one_round = threading.Lock()
        self._round_started: float | None = None
        self._taken = threading.Event()
        """Set when the heartbeat took the lease (and on close): wakes the round thread."""
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def hold(self) -> Held | None:
        """Take or renew the maintenance lease; None while another process holds it. Raises
        AuditUnavailable when the store cannot be written (and then holds nothing)."""
        with self._holding:
            before, self.held = self.held, None
            held = self.leases.acquire(MAINTENANCE, self._broker.settings.lease_ttl)
            if held is not None and (before is None or before.generation != held.generation):
                log.info("took the maintenance lease (generation %d)", held.generation)
            elif held is None and before is not None:
                log.warning("lost the maintenance lease (generation %d)", before.generation)
            self.held = held
            return held

    def round(self) -> None:
        """One round: the singletons if this process holds (or can take) the lease, and this
        process's own part. The store's own jobs come first, then the checkpoint, then the
        jobs that wait on backends (which may take long: they must not hold a checkpoint
        back). The first step that fails ends the round (and raises). Rounds run one at a
        time."""
        with self._one_round:
            self._round_started = time.monotonic()
            try:
                self._round()
            finally:
                self._round_started = None

    def _round(self) -> None:
        broker = self._broker
        if self.hold() is not None:
            self._singletons(self._store_steps())
        broker.record_refusals()
        if self.held is not None:
            self._sign_and_publish()
            self._singletons(self._backend_steps())
        self._follow()
        if self.held is None:
            broker.grants.emergency.refresh_notice()  # the holder's settle_due sets its own
        broker.state.round()
        if not broker.store.truncate_wal():
            log.info("the SQLite WAL could not be truncated (a reader is using it); next round")

    def _store_steps(self) -> Iterator[Callable[[], object]]:
        broker = self._broker
        yield broker.grants.expire_due
        yield broker.grants.purge_spent_tokens
        yield broker.approvals.expire_due
        yield broker.grants.emergency.settle_due
        yield lambda: broker.grants.revocations.settle_stuck(older_than_s=STUCK_ISSUING_S)

    def _backend_steps(self) -> Iterator[Callable[[], object]]:
        broker = self._broker
        yield broker.grants.revocations.process
        now = time.monotonic()
        last = self._last_reconcile
        if last is None or now - last >= broker.settings.reconcile_interval:
            self._last_reconcile = now
            yield self._reconcile

    def _singletons(self, steps: Iterator[Callable[[], object]]) -> None:
        for step in steps:
            if self.held is None or self.hold() is None:
                return  # NOTE: another process holds it now: not one more step on stale ownership
            step()

    def _reconcile(self) -> None:
        revocations = self._broker.grants.revocations
        for item in revocations.reconcile(min_age_s=STUCK_ISSUING_S):
            log.warning("reconciler revoked an orphan credential: %s", item)
        revocations.prune()

    def _sign_and_publish(self) -> None:
        broker = self._broker
        held = self.hold()
        if held is None:
            return
        try:
            with broker.store.write() as session:
                self.leases.check(session.connection(), held)
                broker.audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
        except LeaseLost as exc:
            log.warning("%s: not signing", exc.description)
            self.held = None
            return
        except AuditIntegrityError:
            pass  # reported (CRITICAL, /readyz, metric); exchanges are refused meanwhile
        if broker.publisher is not None:
            broker.publisher.process()

    def _follow(self) -> None:
        """What a process that did not sign this round still owes its own verdicts: the store
        held against its anchor (which moves on to the newest stored checkpoint), and its view
        of the publication backlog."""
        broker = self._broker
        if self.held is not None:
            return
        with broker.store.read() as session:
            broker.audit.check(session)  # which moves the anchor on when the store agrees
        if broker.publisher is not None:
            broker.publisher.refresh()

    def start(self) -> None:
        """Run maintenance in two daemon threads: one takes or renews the lease every
        :func:`tick` (however long a round takes), the other runs a round every
        ``checkpoint_interval`` and at once when the lease was taken, so a checkpoint is never
        older than that bound while the log grows."""
        settings = self._broker.settings

        def heartbeat() -> None:
            every = tick(settings.checkpoint_interval, settings.lease_ttl)
            while not self._stop.wait(every):
                try:
                    if self._stuck(settings.lease_ttl):
                        continue
                    had = self.held
                    held = self.hold()
                    if held is not None and (had is None or had.generation != held.generation):
                        self._taken.set()
                except Exception:  # the store is down: nothing is held; the next tick retries
                    log.exception("the maintenance lease could not be renewed")

        def rounds() -> None:
            while True:
                self._taken.wait(settings.checkpoint_interval)
                self._taken.clear()
                if self._stop.is_set():
                    return
                try:
                    self.round()
                except Exception:  # keep the loop alive; the next round retries
                    log.exception("maintenance round failed")

        self._workers = [
            threading.Thread(target=heartbeat, name="broker-lease", daemon=True),
            threading.Thread(target=rounds, name="broker-maintenance", daemon=True),
        ]
        for worker in self._workers:
            worker.start()

    def _stuck(self, lease_ttl: float) -> bool:
        """Whether the round under way has run for more than :data:`STUCK_ROUND_TTLS` times the
        lease's TTL (a backend call that hangs). Then the lease is given up rather than renewed,
        so that the singletons move on to a process that can run them; this one stops at its
        next step (it renews before each)."""
        started = self._round_started
        if started is None or time.monotonic() - started < STUCK_ROUND_TTLS * lease_ttl:
            return False
        if self.held is not None:
            log.warning("a maintenance round has run for too long: giving the lease up")
            self.leases.release(MAINTENANCE)
            self.held = None
        return True

    def close(self) -> None:
        """Stop the loop and give the lease up, so that another process takes it at once."""
        self._stop.set()
        self.leases.stop_waiting()  # a round waiting for a role's lock gives up now
        self._taken.set()
        for worker in self._workers:
            worker.join(timeout=10)
        if self.held is not None:
            try:
                self.leases.release(MAINTENANCE)
            except Exception:
                log.exception("could not release the maintenance lease")
            self.held = None
