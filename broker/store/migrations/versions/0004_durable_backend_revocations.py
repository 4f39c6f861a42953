"""durable backend revocations

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 19:54:36.492213
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import broker.store.tables

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backend_revocations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("grant_id", sa.String(length=40), nullable=False),
        sa.Column("backend", sa.String(length=20), nullable=False),
        sa.Column("credential_ref", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column(
            "next_attempt_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("done_at", broker.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("backend_revocations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_backend_revocations_grant_id"), ["grant_id"], unique=False
        )
        batch_op.create_index("ix_revocations_due", ["status", "next_attempt_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("backend_revocations", schema=None) as batch_op:
        batch_op.drop_index("ix_revocations_due")
        batch_op.drop_index(batch_op.f("ix_backend_revocations_grant_id"))

    op.drop_table("backend_revocations")
