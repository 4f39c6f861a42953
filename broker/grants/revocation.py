"""Revocation that reaches the backend: a durable queue, retried with backoff until the backend
confirms (across restarts), and a reconciler for backend credentials that no active grant owns.

Every attempt's outcome is an audit event: ``grant.backend_revocation_confirmed`` or
``grant.backend_revocation_failed`` (with ``retry_at``, or ``permanent: true``), and
``reconcile.revoked`` for an orphan the reconciler removed.

A job whose target is already gone ends ``confirmed``: the backends count revoking a credential
that no longer exists as confirmed, and the reconciler attempts the jobs of the grants whose
credentials it removed at once, rather than leaving them for their retry.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.audit.log import AuditLog, rfc3339
from broker.backends.base import BackendRegistry, ExplainedRevocation, Reconcilable
from broker.errors import BrokerError, TemporarilyUnavailable
from broker.grants.model import Grant, GrantStatus
from broker.store.db import Store
from broker.store.tables import GrantRow, RevocationRow

log = logging.getLogger("broker.revocation")
MAX_BACKOFF_S = 600
BATCH = 100


def backoff(attempts: int) -> int:
    """Seconds before retry number ``attempts`` + 1: 5, 10, 20, ... capped at 10 minutes."""
    return int(min(5 * 2 ** max(attempts - 1, 0), MAX_BACKOFF_S))


class Revocations:
    def __init__(
        self,
        *,
        store: Store,
        audit: AuditLog,
        backends: Callable[[], BackendRegistry],
        clock: Callable[[], dt.datetime],
    ) -> None:
        self.store = store
        self.audit = audit
        self.backends = backends
        self.clock = clock

    def enqueue(self, session: Session, row: GrantRow, now: dt.datetime) -> None:
        """Queue the backend revocation of ``row``'s credential, in the caller's transaction."""
        row.backend_revocation = "pending"
        session.add(
            RevocationRow(
                grant_id=row.id,
                backend=row.backend,
                credential_ref=row.credential_ref,
                status="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )

    def process(self, grant_ids: list[str] | None = None) -> int:
        """Attempt every due job (or the pending jobs of ``grant_ids``, due or not). Returns how
        many were confirmed. Never raises for a backend failure: that is recorded and retried."""
        now = self.clock()
        query = select(RevocationRow.id).where(RevocationRow.status == "pending")
        if grant_ids is not None:
            query = query.where(RevocationRow.grant_id.in_(grant_ids))
        else:
            query = query.where(RevocationRow.next_attempt_at <= now)
        with self.store.read() as session:
            job_ids = list(session.scalars(query.order_by(RevocationRow.id).limit(BATCH)))
        return sum(self._attempt(job_id) for job_id in job_ids)

    def _attempt(self, job_id: int) -> bool:
        with self.store.read() as session:
            job = session.get(RevocationRow, job_id)
            row = session.get(GrantRow, job.grant_id) if job else None
            if job is None or row is None or job.status != "pending":
                return False
            grant, backend_name, ref = (
                Grant.from_row(row, self.clock()),
                job.backend,
                job.credential_ref,
            )
        error: BrokerError | None = None
        details: dict[str, Any] | None = None
        try:
            backend = self.backends().get(backend_name)
            with self.backends().timed(backend_name, "revoke") as call:
                if isinstance(backend, ExplainedRevocation):
                    confirmed, details = backend.revoke_explained(grant, ref)
                else:
                    confirmed = backend.revoke(grant, ref)
                call.failed = not confirmed
        except BrokerError as exc:
            confirmed, error = False, exc
        except Exception as exc:
            # NOTE: a bug in one backend call must not escape: jobs are attempted in id order,
            # so it would stop every job behind this one, round after round, for good.
            log.exception("revocation of grant %s at %s raised", grant.id, backend_name)
            confirmed = False
            error = TemporarilyUnavailable(
                f"the {backend_name} backend failed unexpectedly ({type(exc).__name__})"
            )
        retry = error is None or isinstance(error, TemporarilyUnavailable)
        now = self.clock()
        with self.store.write() as session:
            job = session.get(RevocationRow, job_id, with_for_update=True)
            row = session.get(GrantRow, grant.id, with_for_update=True)
            assert job is not None and row is not None
            if job.status != "pending":
                # NOTE: another process (the revoking replica, or the lease holder's retry
                # round) attempted the same job meanwhile and recorded its outcome.
                return False
            job.attempts += 1
            data: dict[str, Any] = {
                "backend": backend_name,
                "credential_ref": ref,
                "attempt": job.attempts,
            }
            if confirmed:
                job.status, job.done_at, job.last_error = "confirmed", now, None
                row.backend_revocation = "confirmed"
                if details is not None:
                    data["details"] = details
                self.audit.append(
                    session, "grant.backend_revocation_confirmed", now, data, grant_id=grant.id
                )
                if details and details.get("fallback"):
                    # Not only this grant: every session of the role issued before the cutoff.
                    self.audit.append(
                        session, "backend.revocation_cutoff", now, details, grant_id=grant.id
                    )
                return True
            job.last_error = error.description if error else "the backend did not confirm"
            data["error"] = job.last_error
            if retry:
                job.next_attempt_at = now + dt.timedelta(seconds=backoff(job.attempts))
                data["retry_at"] = rfc3339(job.next_attempt_at)
            else:
                job.status, job.done_at = "failed", now
                row.backend_revocation = "failed"
                data["permanent"] = True
            self.audit.append(
                session, "grant.backend_revocation_failed", now, data, grant_id=grant.id
            )
        log.warning(
            "revocation of grant %s at %s failed: %s", grant.id, backend_name, data["error"]
        )
        return False

    def settle_stuck(self, older_than_s: int) -> int:
        """Grants left ``issuing`` (the broker died between the backend and the commit) become
        ``failed``, and whatever the backend may have issued for them is queued for revocation."""
        now = self.clock()
        cutoff = now - dt.timedelta(seconds=older_than_s)
        with self.store.write() as session:
            rows = session.scalars(
                select(GrantRow)
                .where(GrantRow.status == GrantStatus.ISSUING, GrantRow.issued_at <= cutoff)
                .with_for_update()
            ).all()
            for row in rows:
                row.status = GrantStatus.FAILED
                self.enqueue(session, row, now)
                self.audit.append(
                    session,
                    "grant.failed",
                    now,
                    {"backend": row.backend, "stuck": True},
                    grant_id=row.id,
                )
        return len(rows)

    def reconcile(self, *, min_age_s: int = 60) -> list[dict[str, Any]]:
        """Revoke every backend credential carrying broker metadata whose grant is not active
        (unknown, revoked, expired, failed, or stuck ``issuing``). ``min_age_s`` spares
        credentials whose grant may still be committing. Returns what was revoked.

        Then attempts the revocation jobs still pending for those grants (a revocation whose
        backend was down, say), due or not: their target is gone, so they end confirmed now
        instead of pending until their next retry."""
        removed = []
        for backend in self.backends().all():
            if not getattr(backend, "external", False) or not isinstance(backend, Reconcilable):
                continue
            for grant_id, ref in backend.list_live(min_age_s=min_age_s):
                status = self._status(grant_id)
                if status == GrantStatus.ACTIVE:
                    continue
                with self.backends().timed(backend.name, "revoke") as call:
                    confirmed = backend.revoke_ref(grant_id, ref)
                    call.failed = not confirmed
                item = {
                    "grant_id": grant_id,
                    "backend": backend.name,
                    "credential_ref": ref,
                    "grant_status": status,
                    "confirmed": confirmed,
                }
                with self.store.write() as session:
                    self.audit.append(
                        session, "reconcile.revoked", self.clock(), item, grant_id=grant_id
                    )
                removed.append(item)
        gone = sorted({str(item["grant_id"]) for item in removed if item["confirmed"]})
        for start in range(0, len(gone), BATCH):
            self.process(gone[start : start + BATCH])
        return removed

    def prune(self) -> None:
        """Let backends drop revocation entries whose credentials have expired anyway."""
        for backend in self.backends().all():
            prune = getattr(backend, "prune", None)
            if prune is not None:
                try:
                    prune()
                except BrokerError as exc:
                    log.warning("pruning %s failed: %s", backend.name, exc.description)

    def _status(self, grant_id: str) -> str | None:
        with self.store.read() as session:
            row = session.get(GrantRow, grant_id)
            return str(Grant.from_row(row, self.clock()).status) if row else None
