"""Stored webhooks by status and type: a cancellation looks for a refund or dispute waiting to
be applied, without reading a backlog of other events.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 14:15:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_webhook_events_status_type"), ["status", "type"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_events_status_type"))
