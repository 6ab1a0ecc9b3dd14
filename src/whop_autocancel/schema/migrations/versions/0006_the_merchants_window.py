"""The merchant's window: every cancellation attempt, the audit of admin actions, each event's
order, each order's matching rule.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 07:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import whop_autocancel.db.base

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cancellation_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("cancellation_id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.String(length=40), nullable=False),
        sa.Column("at", whop_autocancel.db.base.UTCDateTime(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("request", sa.String(length=100), nullable=False),
        sa.Column("membership_id", sa.String(length=64), nullable=True),
        sa.Column("idempotency_key", sa.String(length=100), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(length=30), nullable=False),
        sa.Column("result", sa.String(length=30), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["cancellation_id"],
            ["cancellations.id"],
            name=op.f("fk_cancellation_attempts_cancellation_id_cancellations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cancellation_attempts")),
    )
    with op.batch_alter_table("cancellation_attempts") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_cancellation_attempts_cancellation_id"), ["cancellation_id"]
        )
        batch_op.create_index(batch_op.f("ix_cancellation_attempts_order_id"), ["order_id"])
    op.create_table(
        "admin_actions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", whop_autocancel.db.base.UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=50), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("order_id", sa.String(length=40), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_actions")),
    )
    with op.batch_alter_table("admin_actions") as batch_op:
        batch_op.create_index(batch_op.f("ix_admin_actions_at"), ["at"])
        batch_op.create_index(batch_op.f("ix_admin_actions_order_id"), ["order_id"])
    with op.batch_alter_table("webhook_events") as batch_op:
        batch_op.add_column(sa.Column("order_id", sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f("ix_webhook_events_order_id"), ["order_id"])
    with op.batch_alter_table("orders") as batch_op:
        batch_op.add_column(sa.Column("matched_by", sa.String(length=100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("orders") as batch_op:
        batch_op.drop_column("matched_by")
    with op.batch_alter_table("webhook_events") as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_events_order_id"))
        batch_op.drop_column("order_id")
    op.drop_table("admin_actions")
    op.drop_table("cancellation_attempts")
