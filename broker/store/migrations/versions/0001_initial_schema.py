"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 19:05:12.034590
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import broker.store.tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("grant_id", sa.String(length=40), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("idx"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_events_grant_id"), ["grant_id"], unique=False)

    op.create_table(
        "grants",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("issuer", sa.String(length=100), nullable=False),
        sa.Column("issuer_url", sa.String(length=500), nullable=False),
        sa.Column("subject", sa.String(length=500), nullable=False),
        sa.Column("identity_claims", sa.JSON(), nullable=False),
        sa.Column("subject_jti", sa.String(length=200), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("tier", sa.String(length=20), nullable=False),
        sa.Column("backend", sa.String(length=20), nullable=False),
        sa.Column("rule", sa.String(length=200), nullable=False),
        sa.Column("policy_digest", sa.String(length=80), nullable=False),
        sa.Column("audience", sa.String(length=500), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("lineage", sa.JSON(), nullable=True),
        sa.Column("approval_id", sa.String(length=40), nullable=True),
        sa.Column("issued_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("credential_ref", sa.String(length=200), nullable=True),
        sa.Column("revoked_at", broker.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(length=600), nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.Column("backend_revocation", sa.String(length=16), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.create_index("ix_grants_issued_at", ["issued_at"], unique=False)
        batch_op.create_index("ix_grants_model_status", ["model", "status"], unique=False)
        batch_op.create_index("ix_grants_subject", ["subject"], unique=False)

    log_head = op.create_table(
        "log_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # The one row whose increment assigns dense event indexes (see broker.audit.events).
    op.bulk_insert(log_head, [{"id": 1, "size": 0}])
    op.create_table(
        "used_tokens",
        sa.Column("issuer", sa.String(length=100), nullable=False),
        sa.Column("jti", sa.String(length=200), nullable=False),
        sa.Column("expires_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("issuer", "jti"),
    )
    with op.batch_alter_table("used_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_used_tokens_expires_at"), ["expires_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("used_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_used_tokens_expires_at"))

    op.drop_table("used_tokens")
    op.drop_table("log_head")
    with op.batch_alter_table("grants", schema=None) as batch_op:
        batch_op.drop_index("ix_grants_subject")
        batch_op.drop_index("ix_grants_model_status")
        batch_op.drop_index("ix_grants_issued_at")

    op.drop_table("grants")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_grant_id"))

    op.drop_table("events")
