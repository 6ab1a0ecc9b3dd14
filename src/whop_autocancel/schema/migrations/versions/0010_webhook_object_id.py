"""What each stored webhook is about: `webhook_events.object_id`, the envelope's `data.id` (the
payment's id for `payment.*`, the membership's for `membership.*`, …), indexed. The Whop sweep
asks it whether a payment's webhook came (applied yet or not), so that a backlog of stored
webhooks is not taken for missed ones.

Rows stored before this migration keep NULL: no backfill. The sweep looks back only hours
(since its last run, less `WHOP_SWEEP_OVERLAP`; `WHOP_SWEEP_LOOKBACK` the first time), and a
payment of that window whose webhook was stored before the upgrade is either applied already
(its order records it) or is applied by the worker as the sweep recovers it: applying is
idempotent, so at worst one `missed_webhooks_recovered` alert too many, once.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 16:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch_op:
        batch_op.add_column(sa.Column("object_id", sa.String(length=255), nullable=True))
        batch_op.create_index(batch_op.f("ix_webhook_events_object_id"), ["object_id"])


def downgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_events_object_id"))
        batch_op.drop_column("object_id")
