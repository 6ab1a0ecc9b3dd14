"""Stock items (encrypted), orders waiting for stock, sealed emails.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 13:51:08
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import whop_autocancel.db.base

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stock_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("order_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", whop_autocancel.db.base.UTCDateTime(), nullable=False),
        sa.Column("assigned_at", whop_autocancel.db.base.UTCDateTime(), nullable=True),
        sa.Column("voided_at", whop_autocancel.db.base.UTCDateTime(), nullable=True),
        sa.Column("void_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.id"], name=op.f("fk_stock_items_order_id_orders")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stock_items")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_stock_items_fingerprint")),
        sa.UniqueConstraint("order_id", name=op.f("uq_stock_items_order_id")),
    )
    op.create_index("ix_stock_items_pool_status_id", "stock_items", ["pool", "status", "id"])
    with op.batch_alter_table("emails") as batch_op:
        batch_op.add_column(
            sa.Column("sealed", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    with op.batch_alter_table("orders") as batch_op:
        batch_op.add_column(sa.Column("waiting_for_stock", sa.String(length=64), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_orders_waiting_for_stock"), ["waiting_for_stock"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("orders") as batch_op:
        batch_op.drop_index(batch_op.f("ix_orders_waiting_for_stock"))
        batch_op.drop_column("waiting_for_stock")
    with op.batch_alter_table("emails") as batch_op:
        batch_op.drop_column("sealed")
    op.drop_index("ix_stock_items_pool_status_id", table_name="stock_items")
    op.drop_table("stock_items")
