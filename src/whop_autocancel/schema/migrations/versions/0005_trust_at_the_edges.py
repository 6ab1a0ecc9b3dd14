"""Install time, random idempotency tokens for cancellations, emails that were given up.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 03:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import whop_autocancel.db.base

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_markers",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("at", whop_autocancel.db.base.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_service_markers")),
    )
    with op.batch_alter_table("cancellations") as batch_op:
        batch_op.add_column(sa.Column("idempotency_token", sa.String(length=40), nullable=True))
    with op.batch_alter_table("emails") as batch_op:
        batch_op.add_column(
            sa.Column("failed_at", whop_autocancel.db.base.UTCDateTime(), nullable=True)
        )
        batch_op.create_index(batch_op.f("ix_emails_failed_at"), ["failed_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("emails") as batch_op:
        batch_op.drop_index(batch_op.f("ix_emails_failed_at"))
        batch_op.drop_column("failed_at")
    with op.batch_alter_table("cancellations") as batch_op:
        batch_op.drop_column("idempotency_token")
    op.drop_table("service_markers")
