"""The exchange: verified identity → policy decision → grant + event → credential.

NOTE: the credential is minted before the transaction that records its grant and event, but it
is handed out only after that transaction committed; if the commit fails the credential is
dropped unseen and the caller gets 503. Every attempt, allowed or denied, is an event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Table,
    and_,
    bindparam,
    delete,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker.approvals.rules import Binding
from broker.approvals.service import ApprovalService, binding_for
from broker.audit.log import AuditLog, NewEvent, PreparedEvent, prepare_event, rfc3339
from broker.backends.base import Backend, BackendRegistry, Credential, Refreshing
from broker.backends.jwt import default_audience
from broker.bounds import capped, shown
from broker.errors import (
    AccessDenied,
    ApprovalRequired,
    AuditUnavailable,
    BrokerError,
    Conflict,
    ExchangeFailed,
    Forbidden,
    IdentityRejected,
    InvalidRequest,
    InvalidTarget,
    NotFound,
    TokenReplayed,
)
from broker.grants.emergency import EmergencyUses
from broker.grants.lineage import lineage_datasets, parse_lineage
from broker.grants.model import Grant, GrantStatus
from broker.grants.revocation import Revocations
from broker.identity.types import Person, WorkloadIdentity
from broker.identity.verifier import LEEWAY_SECONDS, KeysNotReady, Verifier
from broker.policy import Decision, LoadedPolicy, Outcome, decide
from broker.policy.model import ActionConfig, EmergencyConfig
from broker.policy.roles import ModelAccess, may_interfere
from broker.store.bulk import Processed, insert_new, insert_processed, process, raw_rows
from broker.store.db import OFF_LOOP, GroupCommit, OffLoop, Steps, Store
from broker.store.tables import GrantRow, UsedTokenRow

log = logging.getLogger("broker.grants")
MAX_REASON_CHARS = 1000
MAX_REASONS_SHOWN = 5
MAX_LIST = 1000
MAX_JTI_CHARS = 200  # the used_tokens.jti column

Clock = Callable[[], dt.datetime]


# NOTE: the exchange writes its rows with SQLAlchemy Core statements built once (no ORM unit of
# work, no autoflush; the compiled statements are cached): most of an exchange's time was the ORM.
def _table(row: type[Any]) -> Table:
    table = row.__table__
    assert isinstance(table, Table)
    return table


_GRANTS, _USED_TOKENS = _table(GrantRow), _table(UsedTokenRow)
_INSERT_GRANT = insert(_GRANTS)
_SPEND_TOKEN = insert(_USED_TOKENS)
_ACTIVATE = (
    update(_GRANTS)
    .where(_GRANTS.c.id == bindparam("grant_id"), _GRANTS.c.status == str(GrantStatus.ISSUING))
    .values(status=str(GrantStatus.ACTIVE), credential_ref=bindparam("ref"))
)
_UNSPEND = delete(_USED_TOKENS).where(
    tuple_(_USED_TOKENS.c.issuer, _USED_TOKENS.c.jti).in_(bindparam("keys", expanding=True))
)
_SPEND_NEW_TOKENS = {
    # NOTE: one statement that spends every token of a batch not spent before and names the
    # ones it spent. PostgreSQL waits for another transaction's uncommitted spend of the same
    # token and skips it once that commits, so replicas racing with one token fail only the
    # exchanges that lost, never a whole batch.
    name: dialect.insert(_USED_TOKENS)
    .on_conflict_do_nothing()
    .returning(_USED_TOKENS.c.issuer, _USED_TOKENS.c.jti)
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}


_TOKEN_KEY = ("issuer", "jti")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    """One parsed ``POST /v1/token`` request. ``subject_token`` is secret."""

    subject_token: str
    model: str
    action: str
    token_type: str
    audience: str | None = None
    reason: str | None = None
    lineage: str | None = None
    approval_id: str | None = None
    requested_ttl: int | None = None
    emergency: bool = False
    """Break-glass: issue now, review after (broker.grants.emergency)."""

    def __repr__(self) -> str:
        return f"ExchangeRequest(model={self.model!r}, action={self.action!r})"


@dataclass(frozen=True, slots=True)
class ExchangeResult:
    grant: Grant
    credential: Credential
    emergency: dict[str, Any] | None = None
    """For a break-glass use: its review request and deadline (broker.grants.emergency)."""


@dataclass(slots=True)
class _ExchangeWrite:
    """What one group-commit step of an exchange writes: its event, the spent token, a new
    grant row, and the activation of an ``issuing`` grant (see :func:`_activate`). The writer
    sets ``index``, the event's index in the log, once it is appended."""

    event: NewEvent | PreparedEvent | None
    spend: dict[str, Any] | None = None
    grant: dict[str, Any] | None = None
    activate: dict[str, Any] | None = None
    index: int | None = None
    grant_row: Processed | None = None
    """``grant`` through its columns' bind processors already (SQLite: broker.store.bulk)."""
    spend_row: Processed | None = None
    """``spend`` likewise."""


@dataclass(slots=True)
class _Attempt:
    spent: bool = False
    """The single-use token was spent by this attempt's first transaction."""


def _new_grant_id() -> str:
    return "g_" + secrets.token_hex(12)


def _actor(person: Person) -> str:
    return f"{person.issuer_name}:{person.subject}"


class GrantService:
    """Exchanges, revocations and reads of grants."""

    def __init__(
        self,
        *,
        policy: LoadedPolicy,
        verifier: Verifier,
        store: Store,
        backends: BackendRegistry,
        audit: AuditLog,
        approvals: ApprovalService,
        clock: Clock = utcnow,
        explain_denials: bool = False,
    ) -> None:
        self.explain_denials = explain_denials
        """Callers get a refusal's full detail (the policy's expected values); else only
        admins and the log do (see BrokerError)."""
        self.audit = audit
        self.approvals = approvals
        self.revocations = Revocations(
            store=store, audit=audit, backends=lambda: self.backends, clock=clock
        )
        self.emergency = EmergencyUses(
            policy=policy, store=store, audit=audit, approvals=approvals, clock=clock
        )
        self.policy = policy
        self.verifier = verifier
        self.store = store
        self.backends = backends
        self.clock = clock
        # NOTE: an exchange's rows and event are committed in a batch with the other exchanges
        # waiting meanwhile, and the caller answers only after that commit (fail closed).
        self._writes = GroupCommit[_ExchangeWrite](store, self._write_batch)

    def close(self) -> None:
        """Commit the exchanges still queued and stop the group-commit writer."""
        self._writes.close()

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> bool:
        """On SQLite, write the group commits on ``loop`` and run exchanges' steps there up to
        their first OFF_LOOP (see :meth:`exchange_steps`, ``broker.api.token.exchange``);
        True then. Call it on the loop."""
        return self._writes.attach(loop)

    async def detach_loop(self) -> None:
        """Back to the writer thread (see GroupCommit.detach)."""
        await self._writes.detach()

    @property
    def steps_on_loop(self) -> bool:
        """Whether the API runs exchanges' steps on its loop (see :meth:`attach_loop`)."""
        return self._writes.on_loop

    # --- exchange ------------------------------------------------------------------------------

    def exchange(self, req: ExchangeRequest) -> ExchangeResult:
        """Run one token exchange, blocking until its grant and event committed. Raises a
        BrokerError subclass for every refusal; the refusal has been recorded as an
        ``exchange.denied`` event before it is raised."""
        return self._writes.drive(self.exchange_steps(req))

    def exchange_steps(
        self, req: ExchangeRequest
    ) -> Steps[_ExchangeWrite | OffLoop, ExchangeResult]:
        """:meth:`exchange` as steps (see :class:`~broker.store.db.Steps`): it yields the writes
        for the group commit, which :meth:`commit_later` takes, and is resumed with each one's
        outcome. NOTE: it yields OFF_LOOP before anything that may block (keys to fetch or
        read, approvals, break-glass, external backends, a transaction of its own); the rest
        of it, the common case whole, runs on the API's event loop."""
        # NOTE: fail closed while the store is proven rewritten (a cached verdict: no query).
        self.audit.integrity.refuse_issuance()
        identity: WorkloadIdentity | None = None
        attempt = _Attempt()
        try:
            try:
                identity = self.verifier.verify_workload(req.subject_token, offline=True)
            except KeysNotReady:
                yield OFF_LOOP
                identity = self.verifier.verify_workload(req.subject_token)
            if identity.jti is not None and len(identity.jti) > MAX_JTI_CHARS:
                raise IdentityRejected(f"claim jti: longer than {MAX_JTI_CHARS} characters")
            return (yield from self._allow(identity, req, attempt))
        except AuditUnavailable:
            raise
        except TokenReplayed as error:
            yield from self._record_denial(req, identity, error, consume=False)
            raise
        except BrokerError as error:
            yield from self._record_denial(req, identity, error, consume=not attempt.spent)
            raise
        except Exception:
            # NOTE: fail closed: an error nobody foresaw (a bug) is a refusal like any other,
            # recorded and spending the token, so the next unknown bug cannot be used silently.
            log.exception("exchange failed unexpectedly (%r); refused", req)
            failed = ExchangeFailed(
                "the broker failed while handling this exchange; nothing was issued and the "
                "attempt was recorded"
            )
            yield from self._record_denial(req, identity, failed, consume=not attempt.spent)
            raise failed from None

    def commit_later(self, write: _ExchangeWrite, done: Callable[[Exception | None], None]) -> None:
        """Queue a write that :meth:`exchange_steps` yielded for the next group commit;
        ``done`` is called with its outcome from the writer thread (see GroupCommit.submit)."""
        self._writes.submit(write, done)

    def decide(
        self, identity: WorkloadIdentity, req: ExchangeRequest, backend: str
    ) -> tuple[Decision, dict[str, Any] | None]:
        """The policy decision for a request, and its parsed lineage. Raises AccessDenied."""
        lineage = parse_lineage(req.lineage)
        decision = decide(
            self.policy,
            identity,
            req.model,
            req.action,
            backend,
            requested_ttl=req.requested_ttl,
            datasets=lineage_datasets(lineage),
        )
        if decision.outcome is Outcome.DENY:
            public, detail = _denial_texts(identity, decision)
            raise AccessDenied(public, detail=detail, disclosed={"reasons": decision.reasons()})
        return decision, lineage

    def binding(
        self,
        identity: WorkloadIdentity,
        req: ExchangeRequest,
        decision: Decision,
        lineage: dict[str, Any] | None,
    ) -> Binding:
        """What an approval of this request covers, the credential's audience included.
        Raises InvalidRequest / InvalidTarget for an audience the request may not have."""
        return binding_for(
            self.policy,
            identity,
            decision,
            token_type=req.token_type,
            audience=self._audience(req, decision),
            lineage=lineage,
            reason=_clean_reason(req.reason),
        )

    def _approval(self, req: ExchangeRequest, decision: Decision, binding: Binding) -> str:
        """The approval id that covers this request, or ApprovalRequired. Without an
        ``approval_id`` it names the request people must review (opened now, or the live one
        for exactly this request). With one that does not cover this request it says why
        (its state, each field that differs) and opens nothing: naming an approval means
        "use this one", and a mismatch is a mistake to correct, not a new request."""
        needed = (
            f"action {decision.action} is tier {decision.tier} and needs "
            f"{decision.approvals_required} approval(s) by other people"
        )
        if req.approval_id:
            problem = self.approvals.unusable_because(req.approval_id, binding)
            if problem is None:
                return req.approval_id
            live = self.approvals.live_request(req.approval_id, binding)
            if live is None:
                raise ApprovalRequired(
                    f"{problem}; {needed}; no request was opened: exchange without "
                    "approval_id, or open one with POST /v1/approvals, to ask for this one"
                )
            view = self.approvals.get(live)
            raise ApprovalRequired(f"{problem}; {needed}; {_progress(view)}", approval_id=live)
        view, _ = self.approvals.open(decision, binding)
        raise ApprovalRequired(f"{needed}; {_progress(view)}", approval_id=view["id"])

    def _gate(
        self,
        identity: WorkloadIdentity,
        req: ExchangeRequest,
        decision: Decision,
        lineage: dict[str, Any] | None,
        grant_id: str,
    ) -> tuple[EmergencyConfig | None, Decision, str | None, Binding | None, str]:
        """What the exchange needs before it may issue: break-glass admitted (and its cap
        checked), or the approval that covers exactly this credential, or neither. Returns
        the emergency config, the decision (break-glass may cap its TTL), the approval id, the
        binding and the audience. Raises ApprovalRequired and the break-glass refusals."""
        approval_id = None
        binding = None
        emergency = None
        if req.emergency:
            emergency, decision = self.emergency.admit(
                decision, _clean_reason(req.reason), req.approval_id
            )
            binding = dataclasses.replace(
                self.binding(identity, req, decision, lineage), emergency_grant=grant_id
            )
            audience = binding.audience
            with self.store.read() as session:  # refused early; counted again when recorded
                self.emergency.check_cap(
                    session, identity.issuer_name, identity.subject, emergency, self.clock()
                )
        elif decision.outcome is Outcome.APPROVAL_REQUIRED:
            # NOTE: the binding holds the audience and TTL, so both are settled before the
            # approval is looked at: an approval covers exactly the credential issued.
            binding = self.binding(identity, req, decision, lineage)
            approval_id = self._approval(req, decision, binding)
            audience = binding.audience
        else:
            audience = self._audience(req, decision)
        return emergency, decision, approval_id, binding, audience

    def _allow(
        self, identity: WorkloadIdentity, req: ExchangeRequest, attempt: _Attempt
    ) -> Steps[_ExchangeWrite | OffLoop, ExchangeResult]:
        backend = self.backends.for_token_type(req.token_type)
        decision, lineage = self.decide(identity, req, backend.name)
        if (
            req.emergency
            or decision.outcome is Outcome.APPROVAL_REQUIRED
            or backend.external
            or (_refreshing(type(backend)) and cast(Refreshing, backend).refresh_due())
        ):
            # The store (approvals, break-glass counts, the signing keys' generation every
            # REFRESH_S) or the backend's network.
            yield OFF_LOOP
        grant_id = _new_grant_id()
        emergency, decision, approval_id, binding, audience = self._gate(
            identity, req, decision, lineage, grant_id
        )
        now = self.clock().replace(microsecond=0)
        claims: dict[str, Any] = {**identity.attributes, **decision.matched_claims}
        grant = Grant(
            id=grant_id,
            issuer=identity.issuer_name,
            issuer_url=identity.issuer,
            subject=identity.subject,
            identity_claims=claims,
            model=decision.model,
            action=decision.action,
            tier=decision.tier,
            backend=backend.name,
            rule=decision.rule or "",
            policy_digest=self.policy.digest,
            audience=audience,
            reason=_clean_reason(req.reason),
            lineage=lineage,
            approval_id=approval_id,
            issued_at=now,
            expires_at=now + dt.timedelta(seconds=decision.ttl_seconds),
            status=GrantStatus.ACTIVE,
        )
        allowed = {
            "identity": _identity_event(identity),
            "model": grant.model,
            "action": grant.action,
            "tier": grant.tier,
            "backend": grant.backend,
            "rule": grant.rule,
            "policy_digest": grant.policy_digest,
            "claims": claims,
            "audience": audience,
            "reason": grant.reason,
            "lineage": lineage,
            "approval_id": approval_id,
            "expires_at": rfc3339(grant.expires_at),
            "token_hmac": self.audit.token_hmac(req.subject_token),
        }

        def commit(session: Session, credential: Credential) -> None:
            """What makes an approved grant active, in one transaction with its event."""
            assert approval_id is not None and binding is not None
            self.approvals.consume(session, approval_id, binding, grant.id)
            self.audit.append(
                session,
                "exchange.allowed",
                now,
                {**allowed, "credential_ref": credential.credential_ref},
                grant_id=grant.id,
            )

        used: dict[str, Any] = {}

        def commit_emergency(session: Session, credential: Credential) -> None:
            """A break-glass grant: its events, its count and its review, in one transaction."""
            assert emergency is not None and binding is not None
            data = {**allowed, "credential_ref": credential.credential_ref, "emergency": True}
            self.audit.append(session, "exchange.allowed", now, data, grant_id=grant.id)
            used.update(self.emergency.record(session, grant, decision, binding, emergency, now))

        def event(credential: Credential) -> NewEvent:
            data = {**allowed, "credential_ref": credential.credential_ref}
            return NewEvent("exchange.allowed", now, data, grant.id)

        committer = commit_emergency if emergency is not None else commit
        own_transaction = approval_id is not None or emergency is not None
        if backend.external:
            approved = committer if own_transaction else None
            result = self._issue_external(grant, identity, backend, attempt, event, approved)
            return self._announced(result, used)
        with self.backends.timed(backend.name, "issue"):
            credential = backend.issue(grant)
        row = _grant_values(grant, identity, credential.credential_ref, GrantStatus.ACTIVE)
        if own_transaction:
            with self.store.write() as session:
                conn = session.connection()
                self._consume(conn, identity)
                conn.execute(_INSERT_GRANT, row)
                committer(session, credential)
            return self._announced(ExchangeResult(grant=grant, credential=credential), used)
        # The common case: committed together with the other exchanges waiting meanwhile.
        yield self._write(event(credential), _spend(identity), row)
        return ExchangeResult(grant=grant, credential=credential)

    def _announced(self, result: ExchangeResult, used: dict[str, Any]) -> ExchangeResult:
        """``result``, announced as a break-glass use when ``used`` holds one (committed)."""
        if not used:
            return result
        self.emergency.announce(used)
        answer = {k: used[k] for k in ("approval_id", "ratify_by", "ttl_seconds")}
        return dataclasses.replace(result, emergency=answer)

    def _issue_external(
        self,
        grant: Grant,
        identity: WorkloadIdentity,
        backend: Backend,
        attempt: _Attempt,
        event: Callable[[Credential], NewEvent],
        approved: Callable[[Session, Credential], None] | None,
    ) -> ExchangeResult:
        """``issuing`` row → backend → ``active``, both writes in group commits (or, with an
        approval, the second in its own transaction with the approval's use). NOTE: this waits
        for its commits in its own thread (it runs before the exchange's first yield), since
        the backend call between them blocks. A crash between the backend and the commit leaves
        an ``issuing`` row and a credential carrying the grant id: the reconciler revokes it.
        Any failure marks the grant ``failed`` and revokes what was issued."""
        issuing = _grant_values(grant, identity, None, GrantStatus.ISSUING)
        self._writes.run(self._write(None, _spend(identity), issuing))
        attempt.spent = True
        try:
            with self.backends.timed(backend.name, "issue"):
                credential = backend.issue(grant)
        except Exception:
            self._fail(grant.id, enqueue=False)
            raise
        activate = {"grant_id": grant.id, "ref": credential.credential_ref}
        try:
            if approved is None:
                self._writes.run(self._write(event(credential), None, activate=activate))
            else:
                with self.store.write() as session:
                    _activate(session.connection(), activate)
                    approved(session, credential)
        except Exception:
            self._fail(grant.id, enqueue=True, credential_ref=credential.credential_ref)
            raise
        return ExchangeResult(grant=grant, credential=credential)

    def _fail(self, grant_id: str, *, enqueue: bool, credential_ref: str | None = None) -> None:
        """Best effort: mark an ``issuing`` grant failed and revoke what the backend issued.
        If the store is down too, the stuck ``issuing`` row is settled by maintenance."""
        try:
            with self.store.write() as session:
                row = session.get(GrantRow, grant_id, with_for_update=True)
                if row is None or row.status != GrantStatus.ISSUING:
                    return
                row.status = GrantStatus.FAILED
                row.credential_ref = credential_ref
                if enqueue:
                    self.revocations.enqueue(session, row, self.clock())
            if enqueue:
                self.revocations.process([grant_id])
        except BrokerError:
            log.exception("could not settle grant %s; maintenance will", grant_id)

    def _audience(self, req: ExchangeRequest, decision: Decision) -> str:
        default = default_audience(decision.model)
        if req.audience is None or req.audience == default:
            return default
        if decision.backend != "jwt":
            raise InvalidRequest("audience applies only to broker JWTs")
        allowed = self.policy.policy.models[decision.model].backends.jwt.audiences
        if req.audience not in allowed:
            text = f"audience {shown(req.audience)} is not allowed for model {decision.model}"
            raise InvalidTarget(text, detail=f"{text}: expected {default!r} or one of {allowed}")
        return req.audience

    @staticmethod
    def _consume(conn: Connection, identity: WorkloadIdentity) -> None:
        """Spend a single-use token's jti in ``conn``'s transaction. Raises TokenReplayed when
        it was spent before; the primary key makes this atomic across concurrent requests."""
        spend = _spend(identity)
        if spend is None:
            return
        try:
            conn.execute(_SPEND_TOKEN, spend)
        except IntegrityError:
            raise _replayed(spend) from None

    def _write(
        self,
        event: NewEvent | None,
        spend: dict[str, Any] | None,
        grant: dict[str, Any] | None = None,
        *,
        activate: dict[str, Any] | None = None,
    ) -> _ExchangeWrite:
        """An exchange's group-commit write. NOTE: on SQLite its rows and event are processed
        here, before the write lock: only the event's index is left for the batch
        (broker.store.bulk, broker.audit.log.prepare_event)."""
        dialect = self.store.engine.dialect
        if not raw_rows(dialect):
            return _ExchangeWrite(event, spend, grant, activate)
        return _ExchangeWrite(
            None if event is None else prepare_event(event, dialect),
            spend,
            grant,
            activate,
            grant_row=None if grant is None else process(dialect, _GRANTS, grant),
            spend_row=None if spend is None else process(dialect, _USED_TOKENS, spend),
        )

    @staticmethod
    def _spend_new(conn: Connection, writes: Sequence[_ExchangeWrite]) -> set[tuple[str, str]]:
        """Spend the tokens of ``writes`` (each has a ``spend``, none twice) that were not
        spent before; return the (issuer, jti) of those spent now."""
        if raw_rows(conn.dialect):
            dialect = conn.dialect
            rows = [w.spend_row or process(dialect, _USED_TOKENS, w.spend or {}) for w in writes]
            spent = insert_new(conn, _USED_TOKENS, rows, _TOKEN_KEY)
            return {(issuer, jti) for issuer, jti in spent}
        statement = _SPEND_NEW_TOKENS[conn.dialect.name]
        found = conn.execute(statement, [w.spend for w in writes if w.spend is not None])
        return {(r.issuer, r.jti) for r in found}

    def _write_batch(
        self, conn: Connection, writes: Sequence[_ExchangeWrite]
    ) -> tuple[list[Exception | None], Callable[[], None] | None]:
        """Write the exchanges of one group commit (see GroupCommit). A token spent before (by
        any process), or twice in the batch, fails its own exchange with TokenReplayed and
        writes nothing of it."""
        outcomes: list[Exception | None] = [None] * len(writes)
        first: dict[tuple[str, str], int] = {}
        for i, write in enumerate(writes):
            if write.spend is not None:
                key = (write.spend["issuer"], write.spend["jti"])
                if key in first:
                    outcomes[i] = _replayed(write.spend)
                else:
                    first[key] = i
        if first:
            spent = self._spend_new(conn, [writes[i] for i in first.values()])
            for key, i in first.items():
                if key not in spent:
                    outcomes[i] = _replayed(writes[i].spend or {})
        logged = [
            (i, w.event)
            for i, w in enumerate(writes)
            if outcomes[i] is None and w.event is not None
        ]
        appended, frontier = self.audit.append_batch(conn, [event for _, event in logged])
        unrecorded = []
        for (i, _), result in zip(logged, appended, strict=True):
            if isinstance(result, ValueError):
                outcomes[i] = InvalidRequest(f"the request cannot be recorded: {result}")
                if (spend := writes[i].spend) is not None:
                    unrecorded.append((spend["issuer"], spend["jti"]))
            else:
                writes[i].index = result
        if unrecorded:  # nothing of these is written: their tokens stay unspent
            conn.execute(_UNSPEND, {"keys": unrecorded})
        done = [w for w, error in zip(writes, outcomes, strict=True) if error is None]
        ready = [w.grant_row for w in done if w.grant_row is not None]
        grants = [w.grant for w in done if w.grant is not None and w.grant_row is None]
        if ready:
            insert_processed(conn, _INSERT_GRANT, ready)
        if grants:
            conn.execute(_INSERT_GRANT, grants)
        for w in done:
            if w.activate is not None:
                # NOTE: its event is in this batch already, so a grant that is no longer
                # ``issuing`` fails the batch closed. Maintenance settles a grant only after it
                # was stuck ``issuing`` for STUCK_ISSUING_S.
                _activate(conn, w.activate)
        if frontier is None:
            return outcomes, None
        return outcomes, lambda: self.audit.committed(frontier)

    def _record_denial(
        self,
        req: ExchangeRequest,
        identity: WorkloadIdentity | None,
        error: BrokerError,
        *,
        consume: bool,
    ) -> Steps[_ExchangeWrite | OffLoop, None]:
        """Record a refused attempt, then give ``error`` the event's ``audit_index``.
        NOTE: a single-use token is spent by the first attempt that passes verification,
        whatever the decision, so a refused token cannot be retried. Every caller-supplied
        string is capped (broker.bounds.capped), so no request can make its denial too large
        to record."""
        data: dict[str, Any] = {
            "error": error.code,
            "description": error.detail,
            "model": capped(req.model),
            "action": capped(req.action),
            "requested_token_type": capped(req.token_type),
            "identity": _identity_event(identity) if identity else None,
            "token_hmac": self.audit.token_hmac(req.subject_token) if req.subject_token else None,
        }
        if isinstance(error, IdentityRejected) and identity is None:
            data["reason"] = error.reason
        event = NewEvent("exchange.denied", self.clock(), data)
        spend = _spend(identity) if consume and identity is not None else None
        write = self._write(event, spend)
        try:
            yield write
        except TokenReplayed as replay:
            yield from self._record_denial(req, identity, replay, consume=False)
            raise replay from None
        error.fields["audit_index"] = write.index
        error.attributed = identity is not None

    # --- reads ---------------------------------------------------------------------------------

    def get(self, grant_id: str) -> Grant:
        with self.store.read() as session:
            row = session.get(GrantRow, grant_id)
            if row is None:
                raise NotFound(f"grant {shown(grant_id)} not found")
            return Grant.from_row(row, self.clock())

    def find(
        self,
        *,
        model: str | None = None,
        subject: str | None = None,
        status: str | None = None,
        limit: int = 100,
        models: Sequence[str] | None = None,
    ) -> list[Grant]:
        """Grants, newest first, filtered; ``status`` is active, expired or revoked;
        ``models`` (a scoped role's models) limits them to those models."""
        now = self.clock()
        query = select(GrantRow).order_by(GrantRow.issued_at.desc(), GrantRow.id)
        if models is not None:
            query = query.where(GrantRow.model.in_(list(models)))
        if model:
            query = query.where(GrantRow.model == model)
        if subject:
            query = query.where(GrantRow.subject == subject)
        if status:
            query = query.where(_status_clause(status, now))
        query = query.limit(max(1, min(limit, MAX_LIST)))
        with self.store.read() as session:
            return [Grant.from_row(row, now) for row in session.scalars(query)]

    def lineage(self, model: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """Grants for model-altering (non-low tier) actions on ``model``, newest first, with
        their approvals' reviews: who changed the model, with what, approved by whom."""
        now = self.clock()
        query = (
            select(GrantRow)
            .where(GrantRow.model == model, GrantRow.tier != "low")
            .order_by(GrantRow.issued_at.desc(), GrantRow.id)
            .limit(max(1, min(limit, MAX_LIST)))
        )
        with self.store.read() as session:
            history = []
            for row in session.scalars(query):
                entry = Grant.from_row(row, now).to_public()
                entry["reviews"] = (
                    self.approvals.reviews_of(session, row.approval_id) if row.approval_id else []
                )
                history.append(entry)
            return history

    def is_active(self, grant_id: str) -> Grant | None:
        """The grant when it is active now, else None (introspection's question)."""
        with self.store.read() as session:
            row = session.get(GrantRow, grant_id)
            if row is None:
                return None
            grant = Grant.from_row(row, self.clock())
        return grant if grant.status is GrantStatus.ACTIVE else None

    # --- revocation ----------------------------------------------------------------------------

    def revoke(
        self, grant_id: str, actor: Person, reason: str, access: ModelAccess | None = None
    ) -> Grant:
        """Revoke one active grant and tell its backend. Conflict when it is not active.
        A revoked grant is never re-activated: rows are only updated ``WHERE status='active'``.
        With ``access`` (the actor's admin role, broker.policy.roles): Forbidden for a model it
        does not cover, and for the owners' rollback path when it is scoped."""
        now = self.clock()
        with self.store.write() as session:
            row = session.get(GrantRow, grant_id, with_for_update=True)
            if row is None:
                raise NotFound(f"grant {shown(grant_id)} not found")
            if access is not None:
                self._check_revoker(access, actor, row)
            current = Grant.from_row(row, now)
            if current.status is not GrantStatus.ACTIVE:
                when = current.revoked_at or current.expires_at
                raise Conflict(f"grant {grant_id} is already {current.status} (since {when})")
            self._mark_revoked(session, row, actor, reason, now)
        self.revocations.process([grant_id])
        return self.get(grant_id)

    def revoke_matching(
        self,
        *,
        actor: Person,
        reason: str,
        model: str | None = None,
        subject: str | None = None,
        issuer: str | None = None,
        access: ModelAccess | None = None,
        spared: list[str] | None = None,
    ) -> list[str]:
        """Bulk revocation of every active grant of a model, subject or issuer (name).
        NOTE: with a scoped ``access`` (the actor's admin role) it never reaches a model the
        scope does not cover (Forbidden when ``model`` is one), and it spares the owners'
        rollback grants, whose ids it adds to ``spared``."""
        if [model, subject, issuer].count(None) != 2:
            raise InvalidRequest("give exactly one of model, subject and issuer")
        if access is not None and model is not None and (refusal := access.refuses(model)):
            raise Forbidden(f"{actor.subject} of issuer {actor.issuer_name} {refusal}")
        now = self.clock()
        column, value = next(
            (c, v)
            for c, v in (
                (GrantRow.model, model),
                (GrantRow.subject, subject),
                (GrantRow.issuer, issuer),
            )
            if v is not None
        )
        query = select(GrantRow).where(column == value, _status_clause("active", now))
        covered = access.models_in(self.policy.policy.models) if access is not None else None
        if covered is not None:
            query = query.where(GrantRow.model.in_(covered))
        with self.store.write() as session:
            rows = list(session.scalars(query.with_for_update()))
            if access is not None:
                kept = [r for r in rows if not may_interfere(access, self._action(r.action))]
                rows = [r for r in rows if r not in kept]
                if spared is not None:
                    spared += [r.id for r in kept]
            for row in rows:
                self._mark_revoked(session, row, actor, reason, now)
            ids = [row.id for row in rows]
        self.revocations.process(ids)
        return ids

    def _action(self, name: str) -> ActionConfig | None:
        return self.policy.policy.actions.get(name)

    def _check_revoker(self, access: ModelAccess, actor: Person, row: GrantRow) -> None:
        refused = self.revoke_refusal(
            access, actor, grant_id=row.id, model=row.model, action=row.action
        )
        if refused is not None:
            raise refused

    def revoke_refusal(
        self, access: ModelAccess, actor: Person, *, grant_id: str, model: str, action: str
    ) -> Forbidden | None:
        """Why :meth:`revoke` refuses ``actor`` (with ``access``, their admin role) the grant
        ``grant_id`` of ``model`` and ``action``, or None: the model is not covered, or the
        grant is the owners' rollback path and the role is scoped. What the console asks
        before it offers a revoke button."""
        who = f"{actor.subject} of issuer {actor.issuer_name}"
        refusal = access.refuses(model)
        if refusal is not None:
            return Forbidden(f"{who} {refusal}")
        if not may_interfere(access, self._action(action)):
            return Forbidden(
                f"{who} holds {access.describe()}: grant {grant_id} is the owners' rollback path "
                f"(action {action} of {model}), which only an admin for every model may revoke"
            )
        return None

    def _mark_revoked(
        self, session: Session, row: GrantRow, actor: Person, reason: str, now: dt.datetime
    ) -> None:
        row.status = GrantStatus.REVOKED
        row.revoked_at = now
        row.revoked_by = _actor(actor)
        row.revoke_reason = _clean_reason(reason)
        self.revocations.enqueue(session, row, now)
        self.audit.append(
            session,
            "grant.revoked",
            now,
            {
                "actor": {"issuer": actor.issuer_name, "subject": actor.subject},
                "reason": row.revoke_reason,
                "model": row.model,
                "action": row.action,
                "backend": row.backend,
                "subject": row.subject,
            },
            grant_id=row.id,
        )

    def purge_spent_tokens(self) -> int:
        """Forget spent single-use ``jti``s whose tokens have expired (plus the verifier's
        leeway): the verifier refuses those tokens anyway. Returns how many rows went."""
        cutoff = self.clock() - dt.timedelta(seconds=2 * LEEWAY_SECONDS)
        with self.store.transaction() as conn:
            done = conn.execute(delete(UsedTokenRow).where(UsedTokenRow.expires_at < cutoff))
        return int(done.rowcount)

    def expire_due(self) -> int:
        """Mark active grants past their expiry as expired, one ``grant.expired`` event each.
        Returns how many. Expiry needs no marking to take effect (reads derive it); this keeps
        the stored status and the log honest."""
        now = self.clock()
        query = select(GrantRow).where(GrantRow.status == "active", GrantRow.expires_at <= now)
        external = {b.name for b in self.backends.all() if b.external}
        with self.store.write() as session:
            rows = list(session.scalars(query.limit(MAX_LIST).with_for_update()))
            for row in rows:
                row.status = GrantStatus.EXPIRED
                if row.backend in external:
                    # The backend's own TTL is the first line; this is the second.
                    self.revocations.enqueue(session, row, now)
                self.audit.append(
                    session,
                    "grant.expired",
                    now,
                    {
                        "model": row.model,
                        "action": row.action,
                        "expires_at": rfc3339(row.expires_at),
                    },
                    grant_id=row.id,
                )
        return len(rows)


def _status_clause(status: str, now: dt.datetime) -> Any:
    if status == "active":
        return and_(GrantRow.status == "active", GrantRow.expires_at > now)
    if status == "expired":
        return or_(
            GrantRow.status == "expired",
            and_(GrantRow.status == "active", GrantRow.expires_at <= now),
        )
    if status == "revoked":
        return GrantRow.status == "revoked"
    raise InvalidRequest(f"status: expected one of active, expired, revoked; got {shown(status)}")


def _progress(view: dict[str, Any]) -> str:
    """Where an approval request stands, for an ``approval_required`` answer."""
    if view["status"] == "approved":
        return f"request {view['id']} is approved: exchange again with approval_id"
    return f"request {view['id']} has {view['approvals']} of {view['approvals_required']}"


def _clean_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    reason = reason.strip()
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidRequest(f"reason is longer than {MAX_REASON_CHARS} characters")
    return reason or None


def _denial_texts(identity: WorkloadIdentity, decision: Decision) -> tuple[str, str]:
    """What a denied caller reads, and the full explanation (for the log and dev mode).

    NOTE: any repository can mint a token our issuers trust, so the caller's text names only
    what its own token and request said (which checks failed, with its values), never a rule,
    an expected value or a pattern (docs/security.md)."""
    head = (
        f"no rule allows subject {shown(identity.subject)} of issuer {identity.issuer_name} "
        f"to {decision.action} model {decision.model} via {decision.backend}"
    )
    if not decision.misses:
        return head, head + ": the policy has no rules"
    failed: dict[str, str] = {}
    for miss in decision.misses:
        failed.setdefault(miss.label, miss.actual)
    public = f"{head}; failed: " + _first(
        [f"{label}: got {actual}" for label, actual in failed.items()], "checks"
    )
    return public, f"{head}: " + _first([m.sentence() for m in decision.misses], "rules")


def _first(items: list[str], what: str) -> str:
    """The first MAX_REASONS_SHOWN of ``items`` joined, with how many more there are."""
    more = len(items) - MAX_REASONS_SHOWN
    return "; ".join(items[:MAX_REASONS_SHOWN]) + (f" (and {more} more {what})" if more > 0 else "")


def _identity_event(identity: WorkloadIdentity) -> dict[str, Any]:
    return {
        "issuer": identity.issuer_name,
        "issuer_url": identity.issuer,
        "subject": identity.subject,
        "jti": identity.jti,
    }


@functools.cache
def _refreshing(backend: type) -> bool:
    """Whether backends of this class are :class:`Refreshing`. NOTE: kept per class: a runtime
    Protocol check walks the protocol's members at every call (15 µs, on every exchange)."""
    return issubclass(backend, Refreshing)


def _spend(identity: WorkloadIdentity) -> dict[str, Any] | None:
    """The ``used_tokens`` row that spends a single-use token, or None (not single use)."""
    if not (identity.single_use and identity.jti) or len(identity.jti) > MAX_JTI_CHARS:
        return None
    expires = dt.datetime.fromtimestamp(identity.expires_at, dt.UTC)
    return {"issuer": identity.issuer_name, "jti": identity.jti, "expires_at": expires}


def _activate(conn: Connection, activate: dict[str, Any]) -> None:
    """Make an ``issuing`` grant ``active`` with its credential_ref (``{"grant_id", "ref"}``).
    Raises Conflict when it is no longer ``issuing``: a grant is never re-activated."""
    if conn.execute(_ACTIVATE, activate).rowcount != 1:
        raise Conflict(f"grant {activate['grant_id']} is no longer issuing")


def _replayed(spend: dict[str, Any]) -> TokenReplayed:
    return TokenReplayed(
        f"token replayed: jti {spend['jti']!r} of issuer {spend['issuer']} was already "
        "exchanged (this issuer allows one exchange per token)"
    )


def _grant_values(
    grant: Grant, identity: WorkloadIdentity, credential_ref: str | None, status: GrantStatus
) -> dict[str, Any]:
    """The ``grants`` row of a new grant, as parameters for ``_INSERT_GRANT``."""
    return {
        "id": grant.id,
        "issuer": grant.issuer,
        "issuer_url": grant.issuer_url,
        "subject": grant.subject,
        "identity_claims": grant.identity_claims,
        "subject_jti": identity.jti,
        "model": grant.model,
        "action": grant.action,
        "tier": grant.tier,
        "backend": grant.backend,
        "rule": grant.rule,
        "policy_digest": grant.policy_digest,
        "audience": grant.audience,
        "reason": grant.reason,
        "lineage": grant.lineage,
        "approval_id": grant.approval_id,
        "issued_at": grant.issued_at,
        "expires_at": grant.expires_at,
        "status": str(status),
        "credential_ref": credential_ref,
    }
