"""Stored webhooks by status, then the moment they came: an apply run reads the oldest waiting
events in the index's order and stops at the last it takes, where it sorted every waiting
event (thousands in a flash sale, at every run). The index on `status` alone goes: this one
leads with it.

On PostgreSQL and MariaDB the build reads every stored event, and PostgreSQL holds writes to
`webhook_events` (incoming webhooks wait) until it is done: with
millions of stored events upgrade in a quiet moment, or on PostgreSQL build it first by hand
with `CREATE INDEX CONCURRENTLY ix_webhook_events_status_received_at ON
webhook_events (status, received_at, id)`, which this migration then keeps.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 18:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_webhook_events_status_received_at"
COLUMNS = ["status", "received_at", "id"]


def upgrade() -> None:
    present = {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("webhook_events")}
    with op.batch_alter_table("webhook_events") as batch_op:
        if INDEX not in present:
            batch_op.create_index(INDEX, COLUMNS, unique=False)
        batch_op.drop_index(batch_op.f("ix_webhook_events_status"))


def downgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_events_status"), ["status"], unique=False)
        batch_op.drop_index(INDEX)
