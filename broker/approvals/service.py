"""Approval requests on the store: open, review, cancel, consume, expire. Every transition is an
audit event in the same transaction as the change."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from broker.approvals.rollback_tests import RollbackTests
from broker.approvals.rules import (
    ApprovalState,
    Binding,
    binding_changes,
    describe_changes,
    distinct_people,
    effective_state,
    persons_of,
    review_refusal,
)
from broker.approvals.webhook import Notifier
from broker.audit.log import AuditLog, rfc3339
from broker.bounds import shown
from broker.errors import BrokerError, Conflict, Forbidden, InvalidRequest, NotFound
from broker.identity.types import Person, WorkloadIdentity
from broker.policy import Decision, LoadedPolicy
from broker.policy.engine import claim_text
from broker.policy.roles import ModelAccess, may_interfere
from broker.store.db import Store
from broker.store.tables import ApprovalRow, ReviewRow

MAX_LIST = 1000


class RollbackUntested(BrokerError):
    """A rollback-gated request lacks a named rollback point or a recorded, passed, fresh and
    independent test of it."""

    code = "rollback_untested"
    status = 409


def _new_id() -> str:
    return "a_" + secrets.token_hex(12)


def binding_for(
    policy: LoadedPolicy,
    identity: WorkloadIdentity,
    decision: Decision,
    *,
    token_type: str,
    audience: str,
    lineage: dict[str, Any] | None,
    reason: str | None,
) -> Binding:
    """What an approval for this request covers: the identity (with the claims the rule checked
    and those ``people`` maps to a person, so separation of duties can see them), the target,
    the credential it will get (backend, ``token_type``, ``audience``, the decision's TTL),
    lineage, reason and policy."""
    claims = dict(decision.matched_claims)
    for refs in policy.policy.people.values():
        for ref in refs:
            if ref.claim and ref.issuer == identity.issuer_name and ref.claim in identity.claims:
                text = claim_text(identity.claims[ref.claim])
                if text is not None:
                    claims[ref.claim] = text
    return Binding(
        issuer=identity.issuer_name,
        subject=identity.subject,
        claims=claims,
        model=decision.model,
        action=decision.action,
        backend=decision.backend,
        requested_token_type=token_type,
        audience=audience,
        ttl_seconds=decision.ttl_seconds,
        lineage=lineage,
        reason=reason,
        policy_digest=policy.digest,
    )


class ApprovalService:
    def __init__(
        self,
        *,
        policy: LoadedPolicy,
        store: Store,
        audit: AuditLog,
        notifier: Notifier | None,
        rollback_tests: RollbackTests,
        clock: Callable[[], dt.datetime],
    ) -> None:
        self.policy = policy
        self.rollback_tests = rollback_tests
        """The recorded rollback tests that the rollback gate counts."""
        self.store = store
        self.audit = audit
        self.notifier = notifier
        self.clock = clock
        self.settings = policy.policy.approval

    # --- views ---------------------------------------------------------------------------------

    def _view(
        self, session: Session, row: ApprovalRow, now: dt.datetime, *, compare: bool = False
    ) -> dict[str, Any]:
        """The request as the API shows it; with ``compare``, also what differs from the last
        approved request for the same model and action (one more query, so single views only)."""
        reviews = session.scalars(
            select(ReviewRow).where(ReviewRow.request_id == row.id).order_by(ReviewRow.at)
        ).all()
        state = effective_state(
            row.status, now=now, expires_at=row.expires_at, approved_until=row.approved_until
        )
        policy = self.policy.policy
        approvals = distinct_people(
            policy,
            [(r.reviewer_issuer, r.reviewer_subject) for r in reviews if r.decision == "approve"],
        )
        bound = row.bound
        claims = bound.get("claims", {})
        view: dict[str, Any] = {
            "id": row.id,
            "status": str(state),
            "model": row.model,
            "action": row.action,
            "backend": row.backend,
            "tier": row.tier,
            "rule": row.rule,
            "requester": {
                "issuer": row.issuer,
                "subject": row.subject,
                "claims": claims,
                "people": sorted(persons_of(policy, row.issuer, row.subject, claims)),
            },
            "requested_token_type": bound.get("requested_token_type"),
            "audience": bound.get("audience"),
            "ttl_seconds": bound.get("ttl_seconds"),
            "lineage": bound.get("lineage"),
            "reason": bound.get("reason"),
            "binding": row.binding,
            "bound": bound,
            "approvals": approvals,
            "approvals_required": row.approvals_required,
            "rollback_required": row.rollback_required,
            "reviews": [
                {
                    "reviewer": {"issuer": r.reviewer_issuer, "subject": r.reviewer_subject},
                    "decision": r.decision,
                    "reason": r.reason,
                    "at": r.at.isoformat(),
                }
                for r in reviews
            ],
            "created_at": row.created_at.isoformat(),
            "expires_at": row.expires_at.isoformat(),
            "decided_at": row.decided_at.isoformat() if row.decided_at else None,
            "approved_until": row.approved_until.isoformat() if row.approved_until else None,
            "used_at": row.used_at.isoformat() if row.used_at else None,
            "grant_id": row.grant_id,
        }
        if compare:
            view["differs_from_last_approved"] = self._against_last_approved(session, row, now)
        return view

    @staticmethod
    def _against_last_approved(
        session: Session, row: ApprovalRow, now: dt.datetime
    ) -> dict[str, Any] | None:
        """What differs between ``row`` and the request for the same model and action approved
        last before it was decided (before now, while it is undecided), or None when there is
        none. Only approvals set ``approved_until``, so it marks a request that was approved
        (and may since be used or expired)."""
        before = row.decided_at or now
        last = session.scalars(
            select(ApprovalRow)
            .where(
                ApprovalRow.model == row.model,
                ApprovalRow.action == row.action,
                ApprovalRow.id != row.id,
                ApprovalRow.approved_until.is_not(None),
                ApprovalRow.decided_at <= before,
            )
            .order_by(ApprovalRow.decided_at.desc(), ApprovalRow.id)
            .limit(1)
        ).first()
        if last is None:
            return None
        assert last.decided_at is not None
        return {
            "approval_id": last.id,
            "decided_at": last.decided_at.isoformat(),
            "changes": [
                {"field": field, "last_approved": old, "this": new}
                for field, old, new in binding_changes(last.bound, row.bound)
            ],
        }

    def get(self, approval_id: str) -> dict[str, Any]:
        with self.store.read() as session:
            row = self._row(session, approval_id)
            return self._view(session, row, self.clock(), compare=True)

    def find(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        limit: int = 100,
        models: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Requests, newest first; ``models`` (a scoped role's models) limits them."""
        now = self.clock()
        query = select(ApprovalRow).order_by(ApprovalRow.created_at.desc(), ApprovalRow.id)
        if models is not None:
            query = query.where(ApprovalRow.model.in_(list(models)))
        if model:
            query = query.where(ApprovalRow.model == model)
        if status and status not in set(ApprovalState):
            known = ", ".join(ApprovalState)
            raise InvalidRequest(f"status: expected one of {known}; got {shown(status)}")
        with self.store.read() as session:
            views = [self._view(session, r, now) for r in session.scalars(query.limit(MAX_LIST))]
        return [v for v in views if status is None or v["status"] == status][: max(1, limit)]

    @staticmethod
    def _row(session: Session, approval_id: str, *, lock: bool = False) -> ApprovalRow:
        row = session.get(ApprovalRow, approval_id, with_for_update=lock)
        if row is None:
            raise NotFound(f"approval request {shown(approval_id)} not found")
        return row

    def reviews_of(self, session: Session, approval_id: str) -> list[dict[str, Any]]:
        row = session.get(ApprovalRow, approval_id)
        return self._view(session, row, self.clock())["reviews"] if row else []

    # --- opening -------------------------------------------------------------------------------

    def open(self, decision: Decision, binding: Binding) -> tuple[dict[str, Any], bool]:
        """The live (pending or approved) request for exactly ``binding``, or a new one.
        Returns (view, created)."""
        now = self.clock()
        digest = binding.digest()
        with self.store.write() as session:
            for row in session.scalars(
                select(ApprovalRow).where(
                    ApprovalRow.binding == digest,
                    ApprovalRow.status.in_([ApprovalState.PENDING, ApprovalState.APPROVED]),
                )
            ):
                state = effective_state(
                    row.status,
                    now=now,
                    expires_at=row.expires_at,
                    approved_until=row.approved_until,
                )
                if state in (ApprovalState.PENDING, ApprovalState.APPROVED):
                    return self._view(session, row, now, compare=True), False
            view = self.open_in(session, decision, binding, now)
        self._notify("approval.requested", view)
        return view, True

    def open_in(
        self, session: Session, decision: Decision, binding: Binding, now: dt.datetime
    ) -> dict[str, Any]:
        """Open a new request for ``binding`` in ``session``'s transaction (its
        ``approval.requested`` event with it) and return its view; the caller notifies
        (:meth:`notify`) once the transaction committed."""
        digest = binding.digest()
        row = ApprovalRow(
            id=_new_id(),
            status=ApprovalState.PENDING,
            binding=digest,
            bound=binding.as_dict(),
            issuer=binding.issuer,
            subject=binding.subject,
            model=binding.model,
            action=binding.action,
            backend=binding.backend,
            tier=decision.tier,
            rule=decision.rule or "",
            approvals_required=decision.approvals_required,
            rollback_required=decision.rollback_required,
            created_at=now,
            expires_at=now + dt.timedelta(seconds=self.settings.pending_ttl),
        )
        session.add(row)
        self.audit.append(
            session,
            "approval.requested",
            now,
            {
                "approval_id": row.id,
                "binding": digest,
                "request": binding.as_dict(),
                "approvals_required": row.approvals_required,
                "tier": row.tier,
            },
        )
        session.flush()
        return self._view(session, row, now, compare=True)

    # --- using ---------------------------------------------------------------------------------

    def unusable_because(self, approval_id: str, binding: Binding) -> str | None:
        """Why ``approval_id`` cannot cover a request bound to ``binding`` now, or None."""
        with self.store.read() as session:
            row = session.get(ApprovalRow, approval_id)
            return self._unusable(session, row, approval_id, binding, self.clock())

    def live_request(self, approval_id: str, binding: Binding) -> str | None:
        """``approval_id`` when it is a live (pending or approved) request for exactly
        ``binding``: the one to wait for, though it cannot be used yet. Else None."""
        now = self.clock()
        with self.store.read() as session:
            row = session.get(ApprovalRow, approval_id)
            if row is None or row.binding != binding.digest():
                return None
            state = effective_state(
                row.status, now=now, expires_at=row.expires_at, approved_until=row.approved_until
            )
            live = state in (ApprovalState.PENDING, ApprovalState.APPROVED)
            return row.id if live else None

    def _unusable(
        self,
        session: Session,
        row: ApprovalRow | None,
        approval_id: str,
        binding: Binding,
        now: dt.datetime,
    ) -> str | None:
        # NOTE: another workload's request is reported like one that does not exist: what
        # it was approved for is not this caller's to read (GET /v1/approvals/{id} agrees).
        if row is None or (row.issuer, row.subject) != (binding.issuer, binding.subject):
            who = "does not exist or was requested by another workload"
            return f"approval {shown(approval_id)} {who}"
        state = effective_state(
            row.status, now=now, expires_at=row.expires_at, approved_until=row.approved_until
        )
        problems = []
        if state is not ApprovalState.APPROVED:
            problems.append(f"approval {row.id} is {state}, not approved")
        if row.binding != binding.digest():
            changes = binding_changes(row.bound, binding.as_dict())
            problems.append(
                f"approval {row.id} was given for a different request: "
                + (describe_changes(changes) or "the binding differs")
            )
        if problems:
            return "; ".join(problems)
        if row.rollback_required:
            # NOTE: the gate again at use: the test that allowed the approval may have gone
            # stale, or a failed one been recorded since.
            return self._rollback_gap(session, row, now)
        return None

    def _rollback_gap(self, session: Session, row: ApprovalRow, now: dt.datetime) -> str | None:
        return self.rollback_tests.gap(
            session,
            model=row.model,
            lineage=row.bound.get("lineage"),
            requester=(row.issuer, row.subject, row.bound.get("claims", {})),
            now=now,
        )

    def consume(self, session: Session, approval_id: str, binding: Binding, grant_id: str) -> None:
        """Mark the approval used by ``grant_id`` in the exchange's own transaction. Single use:
        only an approved, unexpired, matching request is updated. Raises Conflict otherwise."""
        now = self.clock()
        done = session.execute(
            update(ApprovalRow)
            .where(
                ApprovalRow.id == approval_id,
                ApprovalRow.status == ApprovalState.APPROVED,
                ApprovalRow.binding == binding.digest(),
                ApprovalRow.approved_until > now,
            )
            .values(status=ApprovalState.USED, used_at=now, grant_id=grant_id)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict(f"approval {approval_id} was used or expired meanwhile")
        self.audit.append(
            session, "approval.used", now, {"approval_id": approval_id}, grant_id=grant_id
        )

    # --- reviewing -----------------------------------------------------------------------------

    def review(
        self,
        approval_id: str,
        person: Person,
        decision: str,
        reason: str,
        access: ModelAccess | None = None,
    ) -> dict[str, Any]:
        """Record ``person``'s approve/deny. One deny resolves the request as denied; enough
        distinct approvals resolve it as approved (once the rollback gate is satisfied).
        With ``access`` (the reviewer's approver role): Forbidden for a model it does not
        cover, and for a request of the owners' rollback path when it is scoped."""
        if decision not in ("approve", "deny"):
            raise InvalidRequest(f"decision: expected approve or deny, got {decision!r}")
        now = self.clock()
        with self.store.write() as session:
            row = self._row(session, approval_id, lock=True)
            self._settle_expiry(session, row, now)
            earlier = session.scalars(select(ReviewRow).where(ReviewRow.request_id == row.id)).all()
            state = ApprovalState(row.status)
            refused = self._refusal(session, row, state, earlier, person, access, now)
            if refused is not None and (
                decision == "approve" or not isinstance(refused, RollbackUntested)
            ):
                raise refused
            session.add(
                ReviewRow(
                    request_id=row.id,
                    reviewer_issuer=person.issuer_name,
                    reviewer_subject=person.subject,
                    decision=decision,
                    reason=reason,
                    at=now,
                )
            )
            actor = {"issuer": person.issuer_name, "subject": person.subject}
            people = sorted(persons_of(self.policy.policy, person.issuer_name, person.subject, {}))
            self.audit.append(
                session,
                "approval.reviewed",
                now,
                {
                    "approval_id": row.id,
                    "reviewer": {**actor, "people": people},
                    "decision": decision,
                    "reason": reason,
                },
            )
            approvers = [
                (r.reviewer_issuer, r.reviewer_subject) for r in earlier if r.decision == "approve"
            ]
            if decision == "approve":
                approvers.append((person.issuer_name, person.subject))
            approvals = distinct_people(self.policy.policy, approvers)
            resolved = None
            if decision == "deny":
                resolved = ApprovalState.DENIED
            elif approvals >= row.approvals_required:
                resolved = ApprovalState.APPROVED
                row.approved_until = now + dt.timedelta(seconds=self.settings.approved_ttl)
            if resolved is not None:
                row.status = resolved
                row.decided_at = now
                self.audit.append(
                    session,
                    f"approval.{resolved}",
                    now,
                    {"approval_id": row.id, "approvals": approvals, "by": actor},
                )
            session.flush()
            view = self._view(session, row, now, compare=True)
        if resolved is not None:
            self._notify(f"approval.{resolved}", view)
        return view

    def refusal(
        self,
        approval_id: str,
        person: Person,
        decision: str,
        access: ModelAccess | None = None,
    ) -> BrokerError | None:
        """The error :meth:`review` would raise for ``person``'s ``decision`` (with ``access``)
        now, or None: what the console asks before it offers the approve and deny buttons (the
        same rules, so a page never offers what the server refuses)."""
        now = self.clock()
        with self.store.read() as session:
            row = self._row(session, approval_id)
            state = effective_state(
                row.status, now=now, expires_at=row.expires_at, approved_until=row.approved_until
            )
            earlier = session.scalars(select(ReviewRow).where(ReviewRow.request_id == row.id)).all()
            refused = self._refusal(session, row, state, earlier, person, access, now)
        if refused is not None and (
            decision == "approve" or not isinstance(refused, RollbackUntested)
        ):
            return refused
        return None

    def _refusal(
        self,
        session: Session,
        row: ApprovalRow,
        state: ApprovalState,
        earlier: Sequence[ReviewRow],
        person: Person,
        access: ModelAccess | None,
        now: dt.datetime,
    ) -> BrokerError | None:
        """Why ``person`` may not review ``row`` (in ``state``) now: it is resolved, ``access``
        (the reviewer's approver role) does not cover it, the approval rules refuse the
        reviewer, or the rollback gate is not satisfied (:class:`RollbackUntested`, which
        refuses an approve only)."""
        if state is not ApprovalState.PENDING:
            return Conflict(f"approval {row.id} is already {state}; the first resolution is final")
        if access is not None:
            refused = self._reviewer_refusal(access, person, row)
            if refused is not None:
                return refused
        refusal = review_refusal(
            self.policy.policy,
            person,
            model=row.model,
            requester=(row.issuer, row.subject, row.bound.get("claims", {})),
            earlier_reviewers=[(r.reviewer_issuer, r.reviewer_subject) for r in earlier],
        )
        if refusal is not None:
            kind, message = refusal
            return (Conflict if kind == "twice" else Forbidden)(message)
        if row.rollback_required:
            gap = self._rollback_gap(session, row, now)
            if gap:
                return RollbackUntested(f"approval {row.id} cannot complete: {gap}")
        return None

    def cancel(self, approval_id: str, requester: WorkloadIdentity, reason: str) -> dict[str, Any]:
        """Cancel a pending request; only its requester (same issuer and subject) may."""
        now = self.clock()
        with self.store.write() as session:
            row = self._row(session, approval_id, lock=True)
            if (requester.issuer_name, requester.subject) != (row.issuer, row.subject):
                raise Forbidden("only the requester may cancel a request")
            self._settle_expiry(session, row, now)
            if row.status != ApprovalState.PENDING:
                raise Conflict(f"approval {approval_id} is already {row.status}")
            row.status = ApprovalState.CANCELLED
            row.decided_at = now
            self.audit.append(
                session, "approval.cancelled", now, {"approval_id": row.id, "reason": reason}
            )
            session.flush()
            view = self._view(session, row, now, compare=True)
        self._notify("approval.cancelled", view)
        return view

    # --- expiry --------------------------------------------------------------------------------

    def _settle_expiry(self, session: Session, row: ApprovalRow, now: dt.datetime) -> None:
        state = effective_state(
            row.status, now=now, expires_at=row.expires_at, approved_until=row.approved_until
        )
        if state is ApprovalState.EXPIRED and row.status != ApprovalState.EXPIRED:
            was = row.status
            row.status = ApprovalState.EXPIRED
            self.audit.append(session, "approval.expired", now, {"approval_id": row.id, "was": was})

    def expire_due(self) -> int:
        """Mark pending requests past their deadline and unused approvals past their validity
        as expired. Returns how many."""
        now = self.clock()
        with self.store.write() as session:
            rows = session.scalars(
                select(ApprovalRow)
                .where(ApprovalRow.status.in_([ApprovalState.PENDING, ApprovalState.APPROVED]))
                .with_for_update()
            ).all()
            expired = 0
            for row in rows:
                before = row.status
                self._settle_expiry(session, row, now)
                expired += row.status != before
        return expired

    def _reviewer_refusal(
        self, access: ModelAccess, person: Person, row: ApprovalRow
    ) -> Forbidden | None:
        who = f"{person.subject} of issuer {person.issuer_name}"
        refusal = access.refuses(row.model)
        if refusal is not None:
            return Forbidden(f"{who} {refusal}")
        if not may_interfere(access, self.policy.policy.actions.get(row.action)):
            return Forbidden(
                f"{who} holds {access.describe()}: request {row.id} is for the owners' rollback "
                f"path (action {row.action} of {row.model}), which only approvers for every "
                "model review"
            )
        return None

    def view_in(self, session: Session, row: ApprovalRow) -> dict[str, Any]:
        """The API's view of ``row``, read in ``session``."""
        return self._view(session, row, self.clock())

    def notify(self, event: str, view: dict[str, Any]) -> None:
        """Send ``event`` about ``view`` to the webhook (if one is configured)."""
        self._notify(event, view)

    def _notify(self, event: str, view: dict[str, Any]) -> None:
        if self.notifier is not None:
            self.notifier.notify(event, view, at=rfc3339(self.clock()))
