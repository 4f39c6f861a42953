"""emergency uses: break-glass issuances awaiting ratification, counted per identity

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 12:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import broker.store.tables

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "emergency_uses",
        sa.Column("grant_id", sa.String(length=40), nullable=False),
        sa.Column("issuer", sa.String(length=100), nullable=False),
        sa.Column("subject", sa.String(length=500), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("approval_id", sa.String(length=40), nullable=False),
        sa.Column("used_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("ratify_by", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("settled_at", broker.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("grant_id"),
    )
    with op.batch_alter_table("emergency_uses", schema=None) as batch_op:
        batch_op.create_index(
            "ix_emergency_uses_identity", ["issuer", "subject", "used_at"], unique=False
        )
        batch_op.create_index("ix_emergency_uses_status", ["status", "ratify_by"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("emergency_uses", schema=None) as batch_op:
        batch_op.drop_index("ix_emergency_uses_status")
        batch_op.drop_index("ix_emergency_uses_identity")

    op.drop_table("emergency_uses")
