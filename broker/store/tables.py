"""SQLAlchemy 2 tables. Portable between SQLite (embedded default) and PostgreSQL.

Alembic migrations in ``broker/store/migrations`` create these; a test checks that the two agree.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        value = _as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def sqlite_utc_text(value: dt.datetime | None) -> str | None:
    """What a :class:`UTCDateTime` column stores on SQLite, in one step: its
    ``process_bind_param`` and then SQLAlchemy's SQLite ``DATETIME`` storage format
    (``YYYY-MM-DD HH:MM:SS.ffffff``), the same text (``tests/store/test_bulk.py``).

    NOTE: why (docs/performance.md): the two processors in turn cost 6 µs a value, and an
    exchange stores four timestamps; ``isoformat`` writes the same digits in C."""
    if value is None:
        return None
    return _as_utc(value).replace(tzinfo=None).isoformat(" ", "microseconds")


def _as_utc(value: dt.datetime) -> dt.datetime:
    """``value`` in UTC. Raises ValueError for a naive one: its zone would be a guess."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    pass


class GrantRow(Base):
    """One issued authorisation. ``status`` moves active → revoked|expired and never back."""

    __tablename__ = "grants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    issuer: Mapped[str] = mapped_column(String(100))  # policy issuer name
    issuer_url: Mapped[str] = mapped_column(String(500))
    subject: Mapped[str] = mapped_column(String(500))
    identity_claims: Mapped[dict[str, Any]] = mapped_column(JSON)  # the claims that mattered
    subject_jti: Mapped[str | None] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    tier: Mapped[str] = mapped_column(String(20))
    backend: Mapped[str] = mapped_column(String(20))
    rule: Mapped[str] = mapped_column(String(200))
    policy_digest: Mapped[str] = mapped_column(String(80))
    audience: Mapped[str | None] = mapped_column(String(500))
    reason: Mapped[str | None] = mapped_column(Text)
    lineage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    approval_id: Mapped[str | None] = mapped_column(String(40))
    issued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    credential_ref: Mapped[str | None] = mapped_column(String(200))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    revoked_by: Mapped[str | None] = mapped_column(String(600))
    revoke_reason: Mapped[str | None] = mapped_column(Text)
    backend_revocation: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        Index("ix_grants_model_status", "model", "status"),
        Index("ix_grants_subject", "subject"),
        Index("ix_grants_issued_at", "issued_at"),
    )


class EventRow(Base):
    """An audit event. ``idx`` is dense (0, 1, 2, ...) so it can serve as a Merkle leaf index;
    ``body`` holds the exact canonical JSON bytes that will be hashed as the leaf."""

    __tablename__ = "events"

    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    type: Mapped[str] = mapped_column(String(40))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    grant_id: Mapped[str | None] = mapped_column(String(40), index=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)


class LogHeadRow(Base):
    """A single row holding the log size; incrementing it serialises appenders."""

    __tablename__ = "log_head"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    size: Mapped[int] = mapped_column(BigInteger)


class UsedTokenRow(Base):
    """Subject-token ``jti`` values already exchanged, for ``single_use`` issuers."""

    __tablename__ = "used_tokens"

    issuer: Mapped[str] = mapped_column(String(100), primary_key=True)
    jti: Mapped[str] = mapped_column(String(200), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)


class TreeNodeRow(Base):
    """A Merkle tree node: the hash of the perfect subtree of ``2**level`` leaves starting at
    leaf ``idx * 2**level``. Level 0 rows are leaf hashes. Written once, when complete."""

    __tablename__ = "tree_nodes"

    level: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class CheckpointRow(Base):
    """A signed checkpoint (C2SP signed note) of the log at ``size``."""

    __tablename__ = "checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root: Mapped[bytes] = mapped_column(LargeBinary(32))
    note: Mapped[str] = mapped_column(Text)
    signed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ApprovalRow(Base):
    """A just-in-time approval request, bound to ``binding`` (a digest of exactly what was
    asked). pending → approved | denied | cancelled | expired; approved → used | expired."""

    __tablename__ = "approval_requests"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    binding: Mapped[str] = mapped_column(String(80), index=True)
    bound: Mapped[dict[str, Any]] = mapped_column(JSON)  # the binding's fields, to explain diffs
    issuer: Mapped[str] = mapped_column(String(100))
    subject: Mapped[str] = mapped_column(String(500))
    model: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    backend: Mapped[str] = mapped_column(String(20))
    tier: Mapped[str] = mapped_column(String(20))
    rule: Mapped[str] = mapped_column(String(200))
    approvals_required: Mapped[int] = mapped_column()
    rollback_required: Mapped[bool] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    decided_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    approved_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    grant_id: Mapped[str | None] = mapped_column(String(40))

    __table_args__ = (Index("ix_approvals_status_model", "status", "model"),)


class ReviewRow(Base):
    """One person's review of an approval request; each reviewer counts once."""

    __tablename__ = "approval_reviews"

    request_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("approval_requests.id"), primary_key=True
    )
    reviewer_issuer: Mapped[str] = mapped_column(String(100), primary_key=True)
    reviewer_subject: Mapped[str] = mapped_column(String(500), primary_key=True)
    decision: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class RevocationRow(Base):
    """A durable backend revocation job: retried with backoff until the backend confirms,
    across broker restarts."""

    __tablename__ = "backend_revocations"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    grant_id: Mapped[str] = mapped_column(String(40), index=True)
    backend: Mapped[str] = mapped_column(String(20))
    credential_ref: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))  # pending | confirmed | failed
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    done_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_revocations_due", "status", "next_attempt_at"),)


class RollbackTestRow(Base):
    """A rollback test as a workload that the policy allows ``rollback-test`` reported it: the
    rollback point it exercised (exactly one uri and sha256), the result and who reported it.
    Written once, never changed; the rollback gate counts only these."""

    __tablename__ = "rollback_tests"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    point_uri: Mapped[str] = mapped_column(String(2048))
    point_sha256: Mapped[str] = mapped_column(String(64))
    result: Mapped[str] = mapped_column(String(16))  # passed | failed
    evidence_uri: Mapped[str | None] = mapped_column(String(2048))
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    recorded_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    reporter_issuer: Mapped[str] = mapped_column(String(100))  # policy issuer name
    reporter_subject: Mapped[str] = mapped_column(String(500))
    reporter_claims: Mapped[dict[str, Any]] = mapped_column(JSON)  # checked and people claims
    rule: Mapped[str] = mapped_column(String(200))
    audit_index: Mapped[int] = mapped_column(BigInteger)  # its rollback_test.recorded event

    # NOTE: the sha256 and not the uri is indexed: a 2,048-character uri can exceed what a
    # PostgreSQL btree entry holds.
    __table_args__ = (Index("ix_rollback_tests_point", "model", "point_sha256"),)


class PublicationRow(Base):
    """A signed checkpoint waiting to be published to one target (``s3``, ``webhook``);
    deleted once published. ``conflict``: the target holds another checkpoint of that size."""

    __tablename__ = "checkpoint_publications"

    target: Mapped[str] = mapped_column(String(20), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending | conflict
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_publications_due", "status", "next_attempt_at"),)


class LeaseRow(Base):
    """Who may do ``name`` now (see :mod:`broker.store.lease`): held by ``holder`` until
    ``expires_at``; ``generation`` counts the times it changed hands."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(300), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    generation: Mapped[int] = mapped_column(BigInteger)


class KeyRow(Base):
    """A key the broker holds, sealed with the KEK (:mod:`broker.keys.sealing`): the JWT
    signing keys (``slot`` next, current, previous), the audit log's signing key (its origin in
    ``label``) and HMAC secret, the dev issuer's key (``slot`` active)."""

    __tablename__ = "keys"

    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)
    kid: Mapped[str] = mapped_column(String(100), primary_key=True)
    slot: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(Text)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())

    # NOTE: one key per slot of a purpose: two replicas creating the same key at once cannot
    # both commit.
    __table_args__ = (Index("ux_keys_slot", "purpose", "slot", unique=True),)


class KeyRingRow(Base):
    """One row per key purpose: locked by whoever creates or rotates its keys, and its
    ``generation`` counts changes, so a replica learns of a rotation by reading one integer."""

    __tablename__ = "key_rings"

    purpose: Mapped[str] = mapped_column(String(32), primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger)


class EmergencyUseRow(Base):
    """One break-glass use (docs/approvals.md): the grant issued at once, the approval request
    opened for its review, the deadline to ratify it, and what the maintenance round found.
    Counted per identity (the policy's ``max_per_identity``), so the cap holds across replicas."""

    __tablename__ = "emergency_uses"

    grant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    issuer: Mapped[str] = mapped_column(String(100))
    subject: Mapped[str] = mapped_column(String(500))
    model: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    approval_id: Mapped[str] = mapped_column(String(40))
    used_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    ratify_by: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))  # pending | ratified | unratified
    settled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_emergency_uses_identity", "issuer", "subject", "used_at"),
        Index("ix_emergency_uses_status", "status", "ratify_by"),
    )
