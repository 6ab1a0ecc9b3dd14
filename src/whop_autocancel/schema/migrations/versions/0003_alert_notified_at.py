"""Alert digests: when each alert was notified.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 12:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import whop_autocancel.db.base

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("alerts") as batch_op:
        batch_op.add_column(
            sa.Column("notified_at", whop_autocancel.db.base.UTCDateTime(), nullable=True)
        )
    # Every alert raised before digests existed was emailed when it was raised.
    op.execute("UPDATE alerts SET notified_at = created_at")


def downgrade() -> None:
    with op.batch_alter_table("alerts") as batch_op:
        batch_op.drop_column("notified_at")
