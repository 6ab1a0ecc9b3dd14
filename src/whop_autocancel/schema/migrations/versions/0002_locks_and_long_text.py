"""Purchase locks; long text columns on MariaDB/MySQL.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 12:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LONG_COLUMNS = [
    ("webhook_events", "payload", False),
    ("emails", "text_body", False),
    ("emails", "html_body", True),
]


def upgrade() -> None:
    op.create_table(
        "locks",
        sa.Column("key", sa.String(length=150), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_locks")),
    )
    if op.get_bind().dialect.name in ("mysql", "mariadb"):
        for table, column, nullable in LONG_COLUMNS:
            op.alter_column(table, column, type_=mysql.LONGTEXT(), existing_nullable=nullable)


def downgrade() -> None:
    if op.get_bind().dialect.name in ("mysql", "mariadb"):
        for table, column, nullable in LONG_COLUMNS:
            op.alter_column(table, column, type_=sa.Text(), existing_nullable=nullable)
    op.drop_table("locks")
