"""An email sent or given up has no next attempt: `emails.next_attempt_at` becomes nullable and
is cleared for every email done, so that its index holds only the emails still waiting. The
outbox finds the due ones by its range; before, it searched `sent_at IS NULL`, which every
email given up matches too, so each send read all of them.

Emails that a process of the previous version marks sent or failed during a rolling upgrade
keep their next attempt: the outbox still checks `sent_at` and `failed_at` on each row it
finds, so they are never sent again, and the stuck-work sweep clears their next attempt once
they are overdue (`clear_done_emails`).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 21:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import whop_autocancel.db.base

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EMAILS = sa.table(
    "emails",
    sa.column("next_attempt_at", whop_autocancel.db.base.UTCDateTime()),
    sa.column("sent_at", whop_autocancel.db.base.UTCDateTime()),
    sa.column("failed_at", whop_autocancel.db.base.UTCDateTime()),
    sa.column("created_at", whop_autocancel.db.base.UTCDateTime()),
)


def upgrade() -> None:
    with op.batch_alter_table("emails") as batch_op:
        batch_op.alter_column(
            "next_attempt_at",
            existing_type=whop_autocancel.db.base.UTCDateTime(),
            nullable=True,
        )
    op.execute(
        _EMAILS.update()
        .where(sa.or_(_EMAILS.c.sent_at.is_not(None), _EMAILS.c.failed_at.is_not(None)))
        .values(next_attempt_at=None)
    )


def downgrade() -> None:
    op.execute(
        _EMAILS.update()
        .where(_EMAILS.c.next_attempt_at.is_(None))
        .values(
            next_attempt_at=sa.func.coalesce(
                _EMAILS.c.sent_at, _EMAILS.c.failed_at, _EMAILS.c.created_at
            )
        )
    )
    with op.batch_alter_table("emails") as batch_op:
        batch_op.alter_column(
            "next_attempt_at",
            existing_type=whop_autocancel.db.base.UTCDateTime(),
            nullable=False,
        )
