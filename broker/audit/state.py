"""State matches the log: the grants, approvals and backend revocation tables say what it says.

The log is tamper-evident; the tables beside it are not (a database writer can turn a revoked
grant active again, approve a request nobody reviewed, or mark a backend revocation confirmed
so it is never retried). So the tables are held against the log:

* the pure core (:func:`grant_findings`, :func:`approval_findings`, :func:`column_problem`)
  replays one grant's or one approval's events and compares the result with its rows;
* :func:`verify_state` runs it over the whole store (``broker audit verify``);
* :class:`StateWatch` runs the cheap form each maintenance round: the most recent events, the
  active grants, and whatever was found before, with bounded work
  (:data:`WATCH_EVENTS`, :data:`WATCH_GRANTS`);
* :func:`grant_ended_in_log` is introspection's own check, one indexed query.

NOTE: the events table's ``type``, ``grant_id`` and ``at`` columns are copies of what the body
says, kept for indexes; only the body is a Merkle leaf. The checks here read bodies, and
:func:`column_problem` reports a column that no longer says what its body says (a revocation
hidden from the ``grant_id`` index, say).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, exists, select
from sqlalchemy.orm import QueryableAttribute, Session
from sqlalchemy.sql.elements import ColumnElement

from broker.audit.integrity import STATE, Integrity
from broker.audit.log import rfc3339
from broker.store.db import Store
from broker.store.tables import (
    ApprovalRow,
    EventRow,
    GrantRow,
    LogHeadRow,
    ReviewRow,
    RevocationRow,
)

GRANT_ENDINGS = {"grant.revoked": "revoked", "grant.expired": "expired", "grant.failed": "failed"}
"""Events after which a grant is no longer active, and the status they leave it in."""
APPROVAL_STATUSES = {
    f"approval.{status}": status
    for status in ("approved", "denied", "cancelled", "expired", "used")
}
WATCH_EVENTS = 1000
"""How many of the newest events a maintenance round reads."""
WATCH_GRANTS = 200
"""How many grants each query of a maintenance round finds at most."""
BATCH = 5000

Event = Mapping[str, Any]
Row = Mapping[Any, Any]


@dataclass(frozen=True)
class Finding:
    """A row (or an event's columns) that says something the log does not."""

    what: str
    """``grant <id>``, ``approval <id>`` or ``event <index>``."""
    message: str

    def __str__(self) -> str:
        return f"{self.what}: {self.message}"


# --- the pure core -------------------------------------------------------------------------------


def column_problem(
    idx: int, type_: str, grant_id: str | None, at: dt.datetime, event: Any
) -> str | None:
    """Why an event row's indexed columns do not say what its body ``event`` says, or None."""
    if not isinstance(event, dict):
        return "its body is not a JSON object"
    differ = [
        f"{name} {column!r} (the body says {body!r})"
        for name, column, body in (
            ("type", type_, event.get("type")),
            ("grant_id", grant_id, event.get("grant_id")),
            ("at", rfc3339(at), event.get("at")),
        )
        if column != body
    ]
    return f"its columns say {', '.join(differ)}" if differ else None


def _issued(event: Event) -> dict[str, Any]:
    """What an ``exchange.allowed`` event says the grant's row holds (the fields it has)."""
    identity = event.get("identity") or {}
    said = {
        "issuer": identity.get("issuer"),
        "issuer_url": identity.get("issuer_url"),
        "subject": identity.get("subject"),
        "subject_jti": identity.get("jti"),
        "issued_at": event.get("at"),
        "identity_claims": event.get("claims"),
    }
    for name in (
        "model",
        "action",
        "tier",
        "backend",
        "rule",
        "policy_digest",
        "audience",
        "reason",
        "lineage",
        "approval_id",
        "expires_at",
        "credential_ref",
    ):
        if name in event:
            said[name] = event[name]
    return said


def _revoked(event: Event) -> dict[str, Any]:
    actor = event.get("actor") or {}
    return {
        "revoked_at": event.get("at"),
        "revoked_by": f"{actor.get('issuer')}:{actor.get('subject')}",
        "revoke_reason": event.get("reason"),
    }


def _shown(value: Any) -> Any:
    return rfc3339(value) if isinstance(value, dt.datetime) else value


def _differences(row: Row, said: Mapping[str, Any]) -> list[str]:
    return [
        f"{name} {_shown(row.get(name))!r} (the log: {value!r})"
        for name, value in said.items()
        if _shown(row.get(name)) != value
    ]


def grant_findings(
    grant_id: str,
    events: Sequence[tuple[int, Event]],
    row: Row | None,
    jobs: Sequence[Row],
) -> list[Finding]:
    """Replay a grant's events (``(index, event)`` in log order) and compare the outcome with
    its ``grants`` row and its ``backend_revocations`` jobs."""
    what = f"grant {grant_id}"
    allowed: tuple[int, Event] | None = None
    ended: tuple[int, str] | None = None
    revoked: tuple[int, Event] | None = None
    confirmations = permanent_failures = 0
    for idx, event in events:
        kind = event.get("type")
        if kind == "exchange.allowed":
            allowed = (idx, event)
        elif kind in GRANT_ENDINGS:
            ended = (idx, GRANT_ENDINGS[kind])
            if kind == "grant.revoked":
                revoked = (idx, event)
        elif kind == "grant.backend_revocation_confirmed":
            confirmations += 1
        elif kind == "grant.backend_revocation_failed" and event.get("permanent"):
            permanent_failures += 1
    if row is None:
        if allowed is not None or ended is not None:
            at = allowed[0] if allowed is not None else ended[0] if ended is not None else None
            return [Finding(what, f"the log has it (index {at}) but the grants table does not")]
        return []
    status = row["status"]
    found: list[str] = []
    if allowed is None and status in ("active", "revoked", "expired"):
        found.append(f"the grants table says {status} but the log has no exchange.allowed for it")
    if allowed is not None:
        differ = _differences(row, _issued(allowed[1]))
        if differ:
            found.append(f"the grants table says {'; '.join(differ)} (issued at {allowed[0]})")
    expected = ended[1] if ended is not None else "active" if allowed is not None else None
    if expected is not None and status != expected:
        where = ended[0] if ended is not None else allowed[0] if allowed is not None else None
        found.append(f"the grants table says {status} but the log says {expected} (index {where})")
    if revoked is not None:
        differ = _differences(row, _revoked(revoked[1]))
        if differ:
            found.append(f"the grants table says {'; '.join(differ)} (revoked at {revoked[0]})")
        if not jobs:
            found.append(f"revoked at index {revoked[0]} but no backend revocation job exists")
    found += _job_findings(row, jobs, confirmations, permanent_failures)
    return [Finding(what, message) for message in found]


def _job_findings(
    row: Row, jobs: Sequence[Row], confirmations: int, permanent_failures: int
) -> list[str]:
    found = []
    confirmed = sum(1 for job in jobs if job["status"] == "confirmed")
    failed = sum(1 for job in jobs if job["status"] == "failed")
    if confirmed > confirmations:
        found.append(
            f"{confirmed} backend revocation job(s) say confirmed but the log has "
            f"{confirmations} confirmation(s)"
        )
    if failed > permanent_failures:
        found.append(
            f"{failed} backend revocation job(s) say failed for good but the log has "
            f"{permanent_failures} such failure(s)"
        )
    said = row.get("backend_revocation")
    if said == "confirmed" and not confirmations:
        found.append("the grants table says its backend revocation was confirmed; the log does not")
    if said == "failed" and not permanent_failures:
        found.append("the grants table says its backend revocation failed; the log does not")
    return found


def approval_findings(
    approval_id: str,
    events: Sequence[tuple[int, Event]],
    row: Row | None,
    reviews: Sequence[Row],
) -> list[Finding]:
    """Replay an approval request's events and compare with its row and its reviews."""
    what = f"approval {approval_id}"
    requested: tuple[int, Event] | None = None
    status: tuple[int, str] | None = None
    used_by: str | None = None
    logged_reviews: set[tuple[Any, Any, Any]] = set()
    for idx, event in events:
        kind = event.get("type")
        if kind == "approval.requested":
            requested = (idx, event)
        elif kind == "approval.reviewed":
            reviewer = event.get("reviewer") or {}
            logged_reviews.add(
                (reviewer.get("issuer"), reviewer.get("subject"), event.get("decision"))
            )
        if kind in APPROVAL_STATUSES:
            status = (idx, APPROVAL_STATUSES[kind])
            if kind == "approval.used":
                used_by = event.get("grant_id")
    if row is None:
        first = events[0][0] if events else None
        return [Finding(what, f"the log has it (index {first}) but the approvals table does not")]
    found: list[str] = []
    if requested is None:
        found.append("the approvals table has it but the log has no approval.requested for it")
    else:
        request = requested[1].get("request") or {}
        said = {name: request.get(name) for name in ("issuer", "subject", "model", "action")}
        said |= {
            "binding": requested[1].get("binding"),
            "bound": request,
            "approvals_required": requested[1].get("approvals_required"),
            "tier": requested[1].get("tier"),
        }
        differ = _differences(row, said)
        if differ:
            found.append(
                f"the approvals table says {'; '.join(differ)} (requested at {requested[0]})"
            )
    expected = status[1] if status is not None else "pending"
    if row["status"] != expected:
        where = f" (index {status[0]})" if status is not None else ""
        found.append(f"the approvals table says {row['status']} but the log says {expected}{where}")
    if expected == "used" and row.get("grant_id") != used_by:
        found.append(
            f"the approvals table says it was used by {row.get('grant_id')}, the log {used_by}"
        )
    stored_reviews = {(r["reviewer_issuer"], r["reviewer_subject"], r["decision"]) for r in reviews}
    for issuer, subject, decision in sorted(stored_reviews - logged_reviews, key=str):
        found.append(f"a review ({decision} by {subject} of {issuer}) is not in the log")
    for issuer, subject, decision in sorted(logged_reviews - stored_reviews, key=str):
        found.append(f"the log's review ({decision} by {subject} of {issuer}) is not in the table")
    return [Finding(what, message) for message in found]


# --- the whole store -----------------------------------------------------------------------------

_EVENT_COLUMNS = (EventRow.idx, EventRow.type, EventRow.grant_id, EventRow.at, EventRow.body)


def _by_key(conn: Connection, column: QueryableAttribute[Any]) -> ColumnElement[Any]:
    """``column`` ordered as Python orders strings (code points): the merge below relies on it.
    NOTE: PostgreSQL sorts by the database's collation unless told otherwise."""
    expression = column.expression
    return expression.collate("C") if conn.dialect.name == "postgresql" else expression


def _parsed(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _grouped(rows: Iterable[Any], key: Callable[[Any], str]) -> Iterator[tuple[str, list[Any]]]:
    group: list[Any] = []
    current: str | None = None
    for row in rows:
        k = key(row)
        if group and k != current:
            assert current is not None
            yield current, group
            group = []
        current = k
        group.append(row)
    if group:
        assert current is not None
        yield current, group


def _merge(
    *streams: Iterator[tuple[str, list[Any]]],
) -> Iterator[tuple[str, list[list[Any]]]]:
    """Merge streams grouped by key, each sorted by key: per key, its group in each stream."""
    heads = [next(s, None) for s in streams]
    while any(h is not None for h in heads):
        key = min(h[0] for h in heads if h is not None)
        groups: list[list[Any]] = []
        for i, head in enumerate(heads):
            if head is not None and head[0] == key:
                groups.append(head[1])
                heads[i] = next(streams[i], None)
            else:
                groups.append([])
        yield key, groups


class _Approvals:
    """Approval events gathered during a pass over the log (approvals are few: people review
    them), compared with the approvals table at the end."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[int, Event]]] = {}

    def add(self, idx: int, event: Event) -> None:
        approval_id = event.get("approval_id")
        if str(event.get("type", "")).startswith("approval.") and isinstance(approval_id, str):
            self.events.setdefault(approval_id, []).append((idx, event))

    def findings(self, conn: Connection) -> list[Finding]:
        rows = {r["id"]: r for r in conn.execute(select(ApprovalRow.__table__)).mappings()}
        reviews: dict[str, list[Row]] = {}
        for review in conn.execute(select(ReviewRow.__table__)).mappings():
            reviews.setdefault(review["request_id"], []).append(review)
        found = []
        for approval_id in sorted(rows.keys() | self.events.keys()):
            events = sorted(self.events.get(approval_id, []), key=lambda e: e[0])
            found += approval_findings(
                approval_id, events, rows.get(approval_id), reviews.get(approval_id, [])
            )
        return found


def verify_state(conn: Connection) -> list[Finding]:
    """Hold every grant, approval and backend revocation job against the whole log, and every
    event's columns against its body. Streams the log twice (events without a grant in index
    order, then grant events merged with the grants and jobs by grant id); memory is bounded by
    the approvals."""
    found: list[Finding] = []
    approvals = _Approvals()
    loose = conn.execute(
        select(*_EVENT_COLUMNS)
        .where(EventRow.grant_id.is_(None))
        .order_by(EventRow.idx)
        .execution_options(yield_per=BATCH)
    )
    for idx, type_, grant_id, at, body in loose:
        event = _parsed(body)
        problem = column_problem(idx, type_, grant_id, at, event)
        if problem:
            found.append(Finding(f"event {idx}", problem))
        elif event is not None:
            approvals.add(idx, event)
    events = conn.execute(
        select(*_EVENT_COLUMNS)
        .where(EventRow.grant_id.is_not(None))
        .order_by(_by_key(conn, EventRow.grant_id))  # the index's order; idx sorted below
        .execution_options(yield_per=BATCH)
    )
    grants = conn.execute(
        select(GrantRow.__table__)
        .order_by(_by_key(conn, GrantRow.id))
        .execution_options(yield_per=BATCH)
    ).mappings()
    jobs = conn.execute(
        select(RevocationRow.__table__)
        .order_by(_by_key(conn, RevocationRow.grant_id), RevocationRow.id)
        .execution_options(yield_per=BATCH)
    ).mappings()
    for grant_id, (grant_events, rows, grant_jobs) in _merge(
        _grouped(events, lambda r: r.grant_id),
        _grouped(grants, lambda r: r["id"]),
        _grouped(jobs, lambda r: r["grant_id"]),
    ):
        replay = []
        for idx, type_, column_grant, at, body in sorted(grant_events, key=lambda r: r[0]):
            event = _parsed(body)
            problem = column_problem(idx, type_, column_grant, at, event)
            if problem:
                found.append(Finding(f"event {idx}", problem))
            if isinstance(event, dict):
                replay.append((idx, event))
                approvals.add(idx, event)
        found += grant_findings(grant_id, replay, rows[0] if rows else None, grant_jobs)
    return found + approvals.findings(conn)


# --- the cheap form, each maintenance round ------------------------------------------------------

_EVENTS_OF = select(*_EVENT_COLUMNS).where(EventRow.grant_id == bindparam("grant_id"))
_ACTIVE = GrantRow.status == "active"
_ENDED_ACTIVE = (
    select(GrantRow.id)
    .where(
        _ACTIVE,
        exists().where(EventRow.grant_id == GrantRow.id, EventRow.type.in_(list(GRANT_ENDINGS))),
    )
    .limit(WATCH_GRANTS)
)
_UNLOGGED_ACTIVE = (
    select(GrantRow.id)
    .where(
        _ACTIVE,
        ~exists().where(
            and_(EventRow.grant_id == GrantRow.id, EventRow.type == "exchange.allowed")
        ),
    )
    .limit(WATCH_GRANTS)
)


def _events_between(conn: Connection, start: int, end: int) -> list[Any]:
    if start >= end:
        return []
    query = select(*_EVENT_COLUMNS).where(EventRow.idx >= start, EventRow.idx < end)
    return list(conn.execute(query))


def _grant_events(conn: Connection, grant_id: str) -> list[tuple[int, Event]]:
    replay = []
    for idx, _type, _grant, _at, body in conn.execute(_EVENTS_OF, {"grant_id": grant_id}):
        event = _parsed(body)
        if isinstance(event, dict):
            replay.append((idx, event))
    return sorted(replay, key=lambda e: e[0])


def check_grant(conn: Connection, grant_id: str) -> list[Finding]:
    """Hold one grant against its events (found by the ``grant_id`` index)."""
    return check_grants(conn, [grant_id])


_GRANTS_IN = select(GrantRow.__table__).where(GrantRow.id.in_(bindparam("ids", expanding=True)))
_JOBS_IN = (
    select(RevocationRow.__table__)
    .where(RevocationRow.grant_id.in_(bindparam("ids", expanding=True)))
    .order_by(RevocationRow.id)
)
_EVENTS_IN = select(*_EVENT_COLUMNS).where(EventRow.grant_id.in_(bindparam("ids", expanding=True)))
CHECK_CHUNK = 200
"""Grants read per query by :func:`check_grants`."""


def check_grants(conn: Connection, grant_ids: Sequence[str]) -> list[Finding]:
    """:func:`check_grant` of each of ``grant_ids``, in that order, with three queries per
    CHECK_CHUNK grants. NOTE: why: each maintenance round holds up to three times WATCH_GRANTS
    grants against their events, in every process; three queries per grant took 0.63 of the
    round's 0.75 s (profiled), CPU the event loop beside it went without."""
    found: list[Finding] = []
    for start in range(0, len(grant_ids), CHECK_CHUNK):
        chunk = list(dict.fromkeys(grant_ids[start : start + CHECK_CHUNK]))
        rows = {r["id"]: r for r in conn.execute(_GRANTS_IN, {"ids": chunk}).mappings()}
        jobs: dict[str, list[Row]] = {}
        for job in conn.execute(_JOBS_IN, {"ids": chunk}).mappings():
            jobs.setdefault(job["grant_id"], []).append(job)
        events: dict[str, list[tuple[int, Event]]] = {}
        for idx, _type, owner, _at, body in conn.execute(_EVENTS_IN, {"ids": chunk}):
            event = _parsed(body)
            if isinstance(event, dict):
                events.setdefault(str(owner), []).append((idx, event))
        for grant_id in grant_ids[start : start + CHECK_CHUNK]:
            replay = sorted(events.get(grant_id, []), key=lambda e: e[0])
            found += grant_findings(grant_id, replay, rows.get(grant_id), jobs.get(grant_id, []))
    return found


def grant_ended_in_log(conn: Connection, grant_id: str) -> tuple[int, str] | None:
    """The index and type of an event that ended a grant whose row (read in the same
    snapshot: see :func:`snapshot`) says it is active, or None. One indexed query for a grant
    the log did not end; introspection asks it of every active grant."""
    for idx, event in _grant_events(conn, grant_id):
        if event.get("type") in GRANT_ENDINGS and event.get("grant_id") == grant_id:
            status = conn.scalar(select(GrantRow.status).where(GrantRow.id == grant_id))
            # NOTE: ended since the caller read the row (a revocation committed meanwhile) is
            # no disagreement: the row says so too in this snapshot.
            return (idx, str(event["type"])) if status == "active" else None
    return None


def snapshot(session: Session) -> Connection:
    """``session``'s connection, reading one snapshot of the whole store: what every check
    here needs, or a revocation committed between two of its queries would look like a
    disagreement. SQLite's read transactions are snapshots; PostgreSQL's default (READ
    COMMITTED) is not, so there it is REPEATABLE READ. Call it first in the session."""
    postgres = session.get_bind().dialect.name == "postgresql"
    options = {"isolation_level": "REPEATABLE READ"} if postgres else {}
    return session.connection(execution_options=options)


class StateWatch:
    """The cheap form of :func:`verify_state`, one round per maintenance round, reporting to
    ``integrity`` (check ``state``). Each round reads at most twice :data:`WATCH_EVENTS` events:
    the newest not yet seen, and the next slice of a sweep through the older ones (so the whole
    log is covered every ``size / WATCH_EVENTS`` rounds). It checks their columns against their
    bodies; replays the grants they touch, the active grants the log ended or never issued
    (two indexed queries), and every grant or event found wrong before (here or by
    introspection: :meth:`Integrity.suspect`) until it agrees again. Approvals are checked by
    ``broker audit verify`` only. Rounds run one at a time (the maintenance thread)."""

    def __init__(self, store: Store, integrity: Integrity) -> None:
        self._store = store
        self._integrity = integrity
        self._seen = 0
        self._swept = 0
        self._bad_events: dict[int, str] = {}

    def round(self) -> list[Finding]:
        """One round; returns what disagrees. Raises AuditUnavailable when the store fails."""
        suspects = self._integrity.suspects()
        with self._store.read() as session:
            conn = snapshot(session)
            size = int(conn.execute(select(LogHeadRow.size)).scalar_one())
            start = max(self._seen, size - WATCH_EVENTS)
            swept = self._swept if self._swept < start else 0
            rows = [
                *_events_between(conn, start, size),
                *_events_between(conn, swept, min(swept + WATCH_EVENTS, start)),
                *conn.execute(
                    select(*_EVENT_COLUMNS).where(EventRow.idx.in_(list(self._bad_events)))
                ),
            ]
            bad_events: dict[int, str] = {}
            touched: set[str] = set()
            for idx, type_, grant_id, at, body in rows:
                event = _parsed(body)
                problem = column_problem(idx, type_, grant_id, at, event)
                if problem:
                    bad_events[idx] = problem
                for gid in (grant_id, event.get("grant_id") if isinstance(event, dict) else None):
                    if isinstance(gid, str):
                        touched.add(gid)
            touched |= set(conn.scalars(_ENDED_ACTIVE)) | set(conn.scalars(_UNLOGGED_ACTIVE))
            wanted = sorted(suspects) + sorted(touched - suspects)
            findings = check_grants(conn, wanted[: WATCH_GRANTS * 3])
        findings = [Finding(f"event {i}", p) for i, p in sorted(bad_events.items())] + findings
        self._seen = size
        self._swept = min(swept + WATCH_EVENTS, start)
        self._bad_events = bad_events
        wrong = {f.what.removeprefix("grant ") for f in findings}
        self._integrity.clear_suspects(suspects - wrong)
        self._integrity.report(STATE, _summary(findings))
        return findings


def _summary(findings: Sequence[Finding]) -> str | None:
    if not findings:
        return None
    more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
    return f"the store's tables disagree with the log: {findings[0]}{more}"
