"""checkpoint publications: the durable queue of signed checkpoints to publish

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-01 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import broker.store.tables

revision = "0007"
# NOTE: named 0007 so that 0005 and 0006 (under way elsewhere) can come first; whoever merges
# them sets this to the newest of those.
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkpoint_publications",
        sa.Column("target", sa.String(length=20), nullable=False),
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column(
            "next_attempt_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("target", "size"),
    )
    with op.batch_alter_table("checkpoint_publications", schema=None) as batch_op:
        batch_op.create_index("ix_publications_due", ["status", "next_attempt_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("checkpoint_publications", schema=None) as batch_op:
        batch_op.drop_index("ix_publications_due")

    op.drop_table("checkpoint_publications")
