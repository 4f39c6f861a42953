"""Rollback tests on the store: a workload the policy allows ``rollback-test`` reports one with
its own identity token, the broker records it (its row, its ``rollback_test.recorded`` event and
the spent single-use token in one transaction), people read them, and the rollback gate
(:mod:`broker.approvals.rollback`) counts them.

Every report whose token verified is answered, recorded and spends its token, as an exchange
is: a refusal is a ``rollback_test.refused`` event, and its answer carries the event's
``audit_index``.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.approvals.rollback import RecordedTest, Requester, rollback_gap
from broker.approvals.rules import persons_of
from broker.audit.log import AuditLog, rfc3339
from broker.bounds import capped
from broker.errors import (
    AccessDenied,
    AuditUnavailable,
    BrokerError,
    IdentityRejected,
    InvalidRequest,
    TemporarilyUnavailable,
    TokenReplayed,
    Unauthenticated,
)
from broker.grants.lineage import Sha256, Uri
from broker.identity.types import WorkloadIdentity
from broker.policy import Decision, LoadedPolicy, Outcome
from broker.policy.engine import claim_text
from broker.store.db import Store
from broker.store.tables import RollbackTestRow, UsedTokenRow

log = logging.getLogger("broker.rollback_tests")

ROLLBACK_TEST = "rollback-test"
"""The action a rule must allow an identity on a model before it may report tests of it."""
MAX_LIST = 1000
MAX_JTI_CHARS = 200  # the used_tokens.jti column
CLOCK_SKEW = dt.timedelta(minutes=5)
"""How far in the future a reported time may be (the reporter's clock may run ahead)."""

Authorise = Callable[[WorkloadIdentity, str], Decision]
"""The policy's decision for an identity doing :data:`ROLLBACK_TEST` on a model. Raises
AccessDenied (with the same disclosure as an exchange) when no rule allows it."""


class ReportedPoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: Uri
    sha256: Sha256


class RollbackReport(BaseModel):
    """The body of ``POST /v1/rollback-tests``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=200)
    rollback_point: ReportedPoint
    result: Literal["passed", "failed"]
    evidence_uri: Uri | None = None
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _in_order(self) -> RollbackReport:
        if self.started_at and self.finished_at and self.started_at > self.finished_at:
            raise ValueError("started_at is after finished_at")
        return self


def parse_report(body: Any, now: dt.datetime) -> RollbackReport:
    """The report in ``body`` (parsed JSON). Raises InvalidRequest naming the bad field."""
    try:
        report = RollbackReport.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(capped(str(p), 64) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(f"{where}: {message}" if where else message) from None
    for name in ("started_at", "finished_at"):
        at = getattr(report, name)
        if at is not None and at > now + CLOCK_SKEW:
            raise InvalidRequest(f"{name}: {at.isoformat()} is in the future")
    return report


def _new_id() -> str:
    return "rt_" + secrets.token_hex(12)


class RollbackTests:
    def __init__(
        self,
        *,
        policy: LoadedPolicy,
        store: Store,
        audit: AuditLog,
        clock: Callable[[], dt.datetime],
    ) -> None:
        self.policy = policy
        self.store = store
        self.audit = audit
        self.clock = clock

    # --- reporting -----------------------------------------------------------------------------

    def report(
        self, identity: WorkloadIdentity, body: Any, *, authorise: Authorise
    ) -> dict[str, Any]:
        """Record the rollback test in ``body`` that ``identity`` reports; its view. Raises a
        BrokerError for every refusal (recorded first, the token spent): InvalidRequest,
        AccessDenied (no rule allows :data:`ROLLBACK_TEST` on the model, or only with approval),
        Unauthenticated (a single-use token used before)."""
        now = self.clock()
        try:
            if identity.jti is not None and len(identity.jti) > MAX_JTI_CHARS:
                raise IdentityRejected(f"claim jti: longer than {MAX_JTI_CHARS} characters")
            report = parse_report(body, now)
            decision = self._authorise(identity, report.model, authorise)
            return self._record(identity, report, decision, now)
        except AuditUnavailable:
            raise
        except BrokerError as error:
            # A token that was spent before, or whose jti is too long to spend, is not spent.
            spend = not isinstance(error, IdentityRejected)
            raise self._refused(identity, body, error, now, spend=spend) from None
        except Exception:
            # NOTE: fail closed, as an exchange does: a bug is a recorded refusal.
            log.exception("recording a rollback test failed unexpectedly; refused")
            failed = TemporarilyUnavailable(
                "the broker failed while recording this rollback test; nothing was recorded "
                "but the attempt"
            )
            raise self._refused(identity, body, failed, now, spend=True) from None

    def _authorise(self, identity: WorkloadIdentity, model: str, authorise: Authorise) -> Decision:
        if ROLLBACK_TEST not in self.policy.policy.actions:
            raise AccessDenied(
                f"the policy has no action {ROLLBACK_TEST}: no workload may report rollback tests"
            )
        decision = authorise(identity, model)
        if decision.outcome is not Outcome.ALLOW:
            # A report needs no approval of its own: an approval-gated rollback-test action is
            # a policy mistake, refused rather than half-honoured.
            raise AccessDenied(
                f"action {ROLLBACK_TEST} is tier {decision.tier}: reporting a rollback test "
                "needs a rule for a low-tier action"
            )
        return decision

    def _record(
        self,
        identity: WorkloadIdentity,
        report: RollbackReport,
        decision: Decision,
        now: dt.datetime,
    ) -> dict[str, Any]:
        row = RollbackTestRow(
            id=_new_id(),
            model=report.model,
            point_uri=report.rollback_point.uri,
            point_sha256=report.rollback_point.sha256,
            result=report.result,
            evidence_uri=report.evidence_uri,
            started_at=report.started_at,
            finished_at=report.finished_at,
            recorded_at=now,
            reporter_issuer=identity.issuer_name,
            reporter_subject=identity.subject,
            reporter_claims=self._claims(identity, decision),
            rule=decision.rule or "",
        )
        view = _view(row)
        event = {
            "rollback_test_id": row.id,
            **{k: v for k, v in view.items() if k not in ("id", "audit_index")},
            "reporter": {**_identity_event(identity), "claims": row.reporter_claims},
            "policy_digest": self.policy.digest,
        }
        try:
            with self.store.write() as session:
                _spend(session.connection(), identity)
                row.audit_index = self.audit.append(session, "rollback_test.recorded", now, event)
                session.add(row)
        except ValueError as exc:  # the event would exceed MAX_EVENT_BYTES
            raise InvalidRequest(f"the report cannot be recorded: {exc}") from None
        return _view(row)

    def _claims(self, identity: WorkloadIdentity, decision: Decision) -> dict[str, str]:
        """The reporter's claims worth keeping: those the matching rule checked (with ``sub``)
        and those that ``people`` maps to a person, so the gate can tell who reported."""
        claims = dict(decision.matched_claims)
        for refs in self.policy.policy.people.values():
            for ref in refs:
                if ref.claim and ref.issuer == identity.issuer_name:
                    text = claim_text(identity.claims.get(ref.claim))
                    if text is not None:
                        claims[ref.claim] = text
        return claims

    def _refused(
        self,
        identity: WorkloadIdentity,
        body: Any,
        error: BrokerError,
        now: dt.datetime,
        *,
        spend: bool,
    ) -> BrokerError:
        """Record a refused report, spending a single-use token unless ``spend`` is false, and
        return the error to answer with: ``error`` with the event's ``audit_index`` (a rejected
        token as 401), or the replay, when the token turns out to have been spent before.
        Every caller-supplied value is capped."""
        model = body.get("model") if isinstance(body, dict) else None
        data = {
            "error": error.code,
            "description": error.detail,
            "model": capped(model) if isinstance(model, str) else None,
            "reporter": _identity_event(identity),
        }
        try:
            with self.store.write() as session:
                if spend:
                    _spend(session.connection(), identity)
                index = self.audit.append(session, "rollback_test.refused", now, data)
        except TokenReplayed as replay:
            return self._refused(identity, body, replay, now, spend=False)
        error.fields["audit_index"] = index
        error.attributed = True
        if isinstance(error, IdentityRejected):
            return _bearer_rejected(error)
        return error

    # --- reading -------------------------------------------------------------------------------

    def find(
        self,
        *,
        model: str | None = None,
        uri: str | None = None,
        limit: int = 100,
        models: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Recorded rollback tests, newest first, of one model and/or rollback point uri;
        ``models`` (a scoped role's models) limits them."""
        query = select(RollbackTestRow).order_by(
            RollbackTestRow.recorded_at.desc(), RollbackTestRow.id
        )
        if models is not None:
            query = query.where(RollbackTestRow.model.in_(list(models)))
        if model:
            query = query.where(RollbackTestRow.model == model)
        if uri:
            query = query.where(RollbackTestRow.point_uri == uri)
        with self.store.read() as session:
            rows = session.scalars(query.limit(max(1, min(limit, MAX_LIST))))
            return [_view(row) for row in rows]

    # --- the gate ------------------------------------------------------------------------------

    def gap(
        self,
        session: Session,
        *,
        model: str,
        lineage: Mapping[str, Any] | None,
        requester: tuple[str, str, Mapping[str, Any]],
        now: dt.datetime,
    ) -> str | None:
        """What keeps a request for a rollback-gated action from being approved or used now,
        or None (see :func:`broker.approvals.rollback.rollback_gap`). ``requester`` is the
        request's (issuer, subject, bound claims); ``session`` reads the recorded tests."""
        point = (lineage or {}).get("rollback_point") or {}
        tests: list[RecordedTest] = []
        if point.get("sha256"):
            rows = session.scalars(
                select(RollbackTestRow).where(
                    RollbackTestRow.model == model,
                    RollbackTestRow.point_sha256 == point["sha256"],
                    RollbackTestRow.point_uri == point["uri"],
                )
            )
            tests = [self._recorded(row) for row in rows]
        issuer, subject, claims = requester
        who = Requester(issuer, subject, self._persons(issuer, subject, claims))
        max_age = self.policy.policy.approval.rollback_test_max_age
        return rollback_gap(lineage, tests, model=model, requester=who, now=now, max_age=max_age)

    def _recorded(self, row: RollbackTestRow) -> RecordedTest:
        tested_at = min(row.recorded_at, row.finished_at or row.recorded_at)
        return RecordedTest(
            id=row.id,
            passed=row.result == "passed",
            recorded_at=row.recorded_at,
            tested_at=tested_at,
            reporter=(row.reporter_issuer, row.reporter_subject),
            reporter_persons=self._persons(
                row.reporter_issuer, row.reporter_subject, row.reporter_claims
            ),
        )

    def _persons(self, issuer: str, subject: str, claims: Mapping[str, Any]) -> frozenset[str]:
        """The people an identity maps to: the one place the gate matches persons."""
        return frozenset(persons_of(self.policy.policy, issuer, subject, claims))


def _view(row: RollbackTestRow) -> dict[str, Any]:
    def at(value: dt.datetime | None) -> str | None:
        return rfc3339(value) if value is not None else None

    return {
        "id": row.id,
        "model": row.model,
        "rollback_point": {"uri": row.point_uri, "sha256": row.point_sha256},
        "result": row.result,
        "evidence_uri": row.evidence_uri,
        "started_at": at(row.started_at),
        "finished_at": at(row.finished_at),
        "recorded_at": at(row.recorded_at),
        "reporter": {
            "issuer": row.reporter_issuer,
            "subject": row.reporter_subject,
            "claims": row.reporter_claims,
        },
        "rule": row.rule,
        "audit_index": row.audit_index,
    }


def _identity_event(identity: WorkloadIdentity) -> dict[str, Any]:
    return {
        "issuer": identity.issuer_name,
        "issuer_url": identity.issuer,
        "subject": identity.subject,
        "jti": identity.jti,
    }


def _spend(conn: Connection, identity: WorkloadIdentity) -> None:
    """Spend a single-use token's jti in ``conn``'s transaction, as an exchange does (its
    ``used_tokens`` row). Raises TokenReplayed when it was spent before; the primary key makes
    this atomic across concurrent requests and replicas."""
    if not (identity.single_use and identity.jti):
        return
    expires = dt.datetime.fromtimestamp(identity.expires_at, dt.UTC)
    try:
        conn.execute(
            insert(UsedTokenRow),
            {"issuer": identity.issuer_name, "jti": identity.jti, "expires_at": expires},
        )
    except IntegrityError:
        raise TokenReplayed(
            f"token replayed: jti {identity.jti!r} of issuer {identity.issuer_name} was already "
            "used (this issuer allows one use per token)"
        ) from None


def _bearer_rejected(error: IdentityRejected) -> Unauthenticated:
    rejected = Unauthenticated(f"bearer token rejected: {error.description}")
    rejected.reason = "replayed"
    rejected.fields.update(error.fields)
    rejected.attributed = True
    return rejected
