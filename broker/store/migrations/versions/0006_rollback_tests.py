"""rollback tests the broker recorded

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-27 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import broker.store.tables

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rollback_tests",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("point_uri", sa.String(length=2048), nullable=False),
        sa.Column("point_sha256", sa.String(length=64), nullable=False),
        sa.Column("result", sa.String(length=16), nullable=False),
        sa.Column("evidence_uri", sa.String(length=2048), nullable=True),
        sa.Column("started_at", broker.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("finished_at", broker.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("recorded_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("reporter_issuer", sa.String(length=100), nullable=False),
        sa.Column("reporter_subject", sa.String(length=500), nullable=False),
        sa.Column("reporter_claims", sa.JSON(), nullable=False),
        sa.Column("rule", sa.String(length=200), nullable=False),
        sa.Column("audit_index", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rollback_tests", schema=None) as batch_op:
        batch_op.create_index("ix_rollback_tests_point", ["model", "point_sha256"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("rollback_tests", schema=None) as batch_op:
        batch_op.drop_index("ix_rollback_tests_point")

    op.drop_table("rollback_tests")
