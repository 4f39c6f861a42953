"""sealed keys: every key the broker holds, encrypted with the KEK, and one row per purpose

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import broker.store.tables

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

PURPOSES = ("jwt", "audit-signing", "audit-hmac", "dev-issuer", "console-cookie")


def upgrade() -> None:
    op.create_table(
        "keys",
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("kid", sa.String(length=100), nullable=False),
        sa.Column("slot", sa.String(length=16), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", broker.store.tables.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("purpose", "kid"),
    )
    with op.batch_alter_table("keys", schema=None) as batch_op:
        batch_op.create_index("ux_keys_slot", ["purpose", "slot"], unique=True)
    rings = op.create_table(
        "key_rings",
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("purpose"),
    )
    # The rows whose lock serialises creating and rotating each purpose's keys.
    op.bulk_insert(rings, [{"purpose": p, "generation": 0} for p in PURPOSES])


def downgrade() -> None:
    op.drop_table("key_rings")
    with op.batch_alter_table("keys", schema=None) as batch_op:
        batch_op.drop_index("ux_keys_slot")
    op.drop_table("keys")
