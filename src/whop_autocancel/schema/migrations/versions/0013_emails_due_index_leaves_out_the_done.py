"""Emails due: on PostgreSQL, the `next_attempt_at` index holds only the emails not done.

Without statistics (before autovacuum's first round, or with it off) PostgreSQL's planner
judged the index with every email ever sent in it too costly, and scanned and sorted the whole
`emails` table at every claim of the outbox. On SQLite and MariaDB nothing changes.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 12:20:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_emails_next_attempt_at"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index(INDEX, table_name="emails")
    op.create_index(
        INDEX,
        "emails",
        ["next_attempt_at"],
        unique=False,
        postgresql_where="coalesce(failed_at, sent_at) IS NULL",
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index(INDEX, table_name="emails")
    op.create_index(INDEX, "emails", ["next_attempt_at"], unique=False)
