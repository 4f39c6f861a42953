"""approval requests and reviews

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 19:40:54.765144
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import broker.store.tables

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "approval_requests",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("binding", sa.String(length=80), nullable=False),
        sa.Column("bound", sa.JSON(), nullable=False),
        sa.Column("issuer", sa.String(length=100), nullable=False),
        sa.Column("subject", sa.String(length=500), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("backend", sa.String(length=20), nullable=False),
        sa.Column("tier", sa.String(length=20), nullable=False),
        sa.Column("rule", sa.String(length=200), nullable=False),
        sa.Column("approvals_required", sa.Integer(), nullable=False),
        sa.Column("rollback_required", sa.Boolean(), nullable=False),
        sa.Column("created_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("decided_at", broker.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("approved_until", broker.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("used_at", broker.store.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("grant_id", sa.String(length=40), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("approval_requests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_approval_requests_binding"), ["binding"], unique=False)
        batch_op.create_index("ix_approvals_status_model", ["status", "model"], unique=False)

    op.create_table(
        "approval_reviews",
        sa.Column("request_id", sa.String(length=40), nullable=False),
        sa.Column("reviewer_issuer", sa.String(length=100), nullable=False),
        sa.Column("reviewer_subject", sa.String(length=500), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["approval_requests.id"],
        ),
        sa.PrimaryKeyConstraint("request_id", "reviewer_issuer", "reviewer_subject"),
    )


def downgrade() -> None:
    op.drop_table("approval_reviews")
    with op.batch_alter_table("approval_requests", schema=None) as batch_op:
        batch_op.drop_index("ix_approvals_status_model")
        batch_op.drop_index(batch_op.f("ix_approval_requests_binding"))

    op.drop_table("approval_requests")
