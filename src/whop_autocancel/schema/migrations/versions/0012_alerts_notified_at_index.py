"""Alerts by `notified_at`: every stuck-work sweep looks for the folded alerts waiting for their
kind's digest (`notified_at IS NULL`), and read every alert ever raised to find them.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 22:50:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("alerts") as batch_op:
        batch_op.create_index(batch_op.f("ix_alerts_notified_at"), ["notified_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("alerts") as batch_op:
        batch_op.drop_index(batch_op.f("ix_alerts_notified_at"))
