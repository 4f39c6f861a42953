"""Break-glass: an action that needs approval, issued at once with a capped lifetime, loudly,
and reviewed after the fact (docs/approvals.md "Break-glass").

A use is admitted only for a request the policy would otherwise send to approval (a matching
rule; the approvals are what is skipped, nothing else), with a reason, by an identity under
its cap. In the transaction that records the grant it writes ``emergency.used``, counts and
records the use (``emergency_uses``: the cap holds across replicas), and opens the approval
request whose approval ratifies it. NOTE: fail closed: if any of it cannot be written, the
credential is never handed out. Each maintenance round settles the uses whose review ended or
whose time ran out (:meth:`EmergencyUses.settle_due`): ``emergency.ratified`` or, loudly,
``emergency.unratified``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker.approvals.rules import ApprovalState, Binding
from broker.approvals.service import ApprovalService
from broker.audit.log import AuditLog, rfc3339
from broker.errors import AccessDenied, InvalidRequest
from broker.grants.model import Grant
from broker.policy import Decision, LoadedPolicy, Outcome
from broker.policy.model import EmergencyConfig
from broker.store.db import Store
from broker.store.tables import ApprovalRow, EmergencyUseRow

log = logging.getLogger("broker.emergency")
NOTICE_DAYS = 7
"""How long an unratified use stays in ``/readyz``'s notices."""
MAX_SETTLE = 500
MAX_NAMED = 5

Use = dict[str, Any]
Hook = Callable[[Use], None]


def _ratified(row: ApprovalRow | None, by: dt.datetime) -> bool | None:
    """True: approved by ``by``; False: denied, cancelled, expired unreviewed or approved too
    late; None: still pending (undecided)."""
    if row is None:
        return False
    if row.status == ApprovalState.PENDING:
        return None
    approved = row.status in (ApprovalState.APPROVED, ApprovalState.USED) or (
        row.status == ApprovalState.EXPIRED and row.decided_at is not None
    )
    return approved and row.decided_at is not None and row.decided_at <= by


class EmergencyUses:
    """Admits, records and settles break-glass uses. ``on_used`` and ``on_unratified`` are
    called (after the commit) with each use: the metrics hang there."""

    def __init__(
        self,
        *,
        policy: LoadedPolicy,
        store: Store,
        audit: AuditLog,
        approvals: ApprovalService,
        clock: Callable[[], dt.datetime],
    ) -> None:
        self.policy = policy
        self.store = store
        self.audit = audit
        self.approvals = approvals
        self.clock = clock
        self.on_used: list[Hook] = []
        self.on_unratified: list[Hook] = []
        self._notice: str | None = None

    def admit(
        self, decision: Decision, reason: str | None, approval_id: str | None
    ) -> tuple[EmergencyConfig, Decision]:
        """The action's emergency settings and the decision with its TTL capped, or a refusal
        naming why (AccessDenied: the action allows no emergency use; InvalidRequest: no
        reason, an ``approval_id``, or an action that needs no approval)."""
        action = self.policy.policy.actions.get(decision.action)
        config = action.emergency if action is not None else None
        if decision.outcome is Outcome.ALLOW:
            raise InvalidRequest(
                f"emergency: action {decision.action} needs no approval; ask without emergency"
            )
        if config is None:
            raise AccessDenied(f"action {decision.action} allows no emergency use")
        if not reason:
            raise InvalidRequest("emergency: a reason is required (why the approval cannot wait)")
        if approval_id:
            raise InvalidRequest(
                "emergency: give no approval_id (an emergency use is reviewed after)"
            )
        ttl = min(decision.ttl_seconds, config.ttl_cap)
        return config, dataclasses.replace(decision, ttl_seconds=ttl)

    def check_cap(
        self, session: Session, issuer: str, subject: str, config: EmergencyConfig, now: dt.datetime
    ) -> None:
        """Raise AccessDenied if ``issuer``/``subject`` used emergencies ``count`` times within
        the last ``per`` seconds."""
        rate = config.max_per_identity
        since = now - dt.timedelta(seconds=rate.per)
        used = session.execute(
            select(func.count())
            .select_from(EmergencyUseRow)
            .where(
                EmergencyUseRow.issuer == issuer,
                EmergencyUseRow.subject == subject,
                EmergencyUseRow.used_at > since,
            )
        ).scalar_one()
        if used >= rate.count:
            raise AccessDenied(
                f"emergency: this identity used its {rate.count} emergency use(s) within "
                f"{rate.per}s; ask for approval instead"
            )

    def record(
        self,
        session: Session,
        grant: Grant,
        decision: Decision,
        binding: Binding,
        config: EmergencyConfig,
        now: dt.datetime,
    ) -> Use:
        """In the grant's transaction, after its ``exchange.allowed``: the cap (counted now,
        behind the log's write lock, so concurrent uses on other replicas are counted), the
        review request, the ``emergency_uses`` row and the ``emergency.used`` event."""
        self.check_cap(session, grant.issuer, grant.subject, config, now)
        view = self.approvals.open_in(session, decision, binding, now)
        ratify_by = now + dt.timedelta(seconds=config.ratify_within)
        session.add(
            EmergencyUseRow(
                grant_id=grant.id,
                issuer=grant.issuer,
                subject=grant.subject,
                model=grant.model,
                action=grant.action,
                approval_id=view["id"],
                used_at=now,
                ratify_by=ratify_by,
                status="pending",
            )
        )
        use: Use = {
            "grant_id": grant.id,
            "approval_id": view["id"],
            "model": grant.model,
            "action": grant.action,
            "tier": grant.tier,
            "identity": {"issuer": grant.issuer, "subject": grant.subject},
            "reason": grant.reason,
            "ttl_seconds": decision.ttl_seconds,
            "ratify_by": rfc3339(ratify_by),
            "approvals_required": decision.approvals_required,
        }
        self.audit.append(session, "emergency.used", now, use, grant_id=grant.id)
        session.flush()
        return {**use, "approval": view}

    def announce(self, use: Use) -> None:
        """After the commit: the webhook (``emergency.used``, then the review's
        ``approval.requested``), a WARNING line and the ``on_used`` hooks."""
        view = use["approval"]
        self.approvals.notify("emergency.used", {**view, "emergency": _public(use)})
        self.approvals.notify("approval.requested", view)
        log.warning(
            "EMERGENCY use of %s on %s by %s:%s (grant %s); ratify by %s (approval %s)",
            use["action"],
            use["model"],
            use["identity"]["issuer"],
            use["identity"]["subject"],
            use["grant_id"],
            use["ratify_by"],
            use["approval_id"],
        )
        for hook in self.on_used:
            hook(use)

    def settle_due(self) -> int:
        """One maintenance round: each pending use whose review ended or whose time ran out
        becomes ``ratified`` or ``unratified`` (with its event; the latter also a webhook, an
        ERROR line, the ``on_unratified`` hooks and a ``/readyz`` notice). Returns how many
        were found unratified."""
        now = self.clock()
        flagged: list[tuple[Use, dict[str, Any]]] = []
        with self.store.write() as session:
            rows = session.scalars(
                select(EmergencyUseRow)
                .where(EmergencyUseRow.status == "pending")
                .order_by(EmergencyUseRow.ratify_by)
                .limit(MAX_SETTLE)
                .with_for_update()
            ).all()
            for row in rows:
                approval = session.get(ApprovalRow, row.approval_id)
                verdict = _ratified(approval, row.ratify_by)
                if verdict is None and now < row.ratify_by:
                    continue
                row.status = "ratified" if verdict else "unratified"
                row.settled_at = now
                use = _use_of(row, approval)
                self.audit.append(
                    session, f"emergency.{row.status}", now, use, grant_id=row.grant_id
                )
                if not verdict:
                    flagged.append(
                        (use, self.approvals.view_in(session, approval) if approval else {})
                    )
            self._notice = self._unratified_notice(session, now)
        for use, view in flagged:
            log.error(
                "EMERGENCY use not ratified: grant %s (%s on %s by %s): %s",
                use["grant_id"],
                use["action"],
                use["model"],
                use["identity"]["subject"],
                use["why"],
            )
            self.approvals.notify("emergency.unratified", {**view, "emergency": use})
            for hook in self.on_unratified:
                hook(use)
        return len(flagged)

    def refresh_notice(self) -> None:
        """Read the ``/readyz`` notice again (on a process that does not settle uses itself:
        another replica holds the maintenance lease)."""
        with self.store.read() as session:
            self._notice = self._unratified_notice(session, self.clock())

    @staticmethod
    def _unratified_notice(session: Session, now: dt.datetime) -> str | None:
        since = now - dt.timedelta(days=NOTICE_DAYS)
        rows = session.scalars(
            select(EmergencyUseRow)
            .where(EmergencyUseRow.status == "unratified", EmergencyUseRow.settled_at > since)
            .order_by(EmergencyUseRow.settled_at.desc())
            .limit(MAX_SETTLE)
        ).all()
        if not rows:
            return None
        named = ", ".join(
            f"{r.grant_id} ({r.action} on {r.model} by {r.subject})" for r in rows[:MAX_NAMED]
        )
        more = f" and {len(rows) - MAX_NAMED} more" if len(rows) > MAX_NAMED else ""
        return (
            f"{len(rows)} emergency use(s) not ratified in the last {NOTICE_DAYS} days: "
            f"{named}{more}"
        )

    def notices(self) -> dict[str, str]:
        """``/readyz`` notices, as of the last maintenance round (no query here)."""
        return {"emergency": self._notice} if self._notice else {}


def _use_of(row: EmergencyUseRow, approval: ApprovalRow | None) -> Use:
    """The event (and webhook) body of a settled use; ``why`` says what its review came to."""
    status = approval.status if approval is not None else "missing"
    deadline = rfc3339(row.ratify_by)
    if row.status == "ratified":
        why = "approved in time"
    elif status in (ApprovalState.PENDING, "missing"):
        why = f"the review request is {status} at the deadline {deadline}"
    else:
        why = f"the review request ended {status} (deadline {deadline})"
    return {
        "grant_id": row.grant_id,
        "approval_id": row.approval_id,
        "model": row.model,
        "action": row.action,
        "identity": {"issuer": row.issuer, "subject": row.subject},
        "used_at": rfc3339(row.used_at),
        "ratify_by": rfc3339(row.ratify_by),
        "why": why,
    }


def _public(use: Use) -> Use:
    return {k: v for k, v in use.items() if k != "approval"}
