"""Stock items: one row per account, license key or code, handed out exactly once."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from whop_autocancel.db.base import Base, UTCDateTime


class StockStatus(enum.StrEnum):
    AVAILABLE = "available"
    ASSIGNED = "assigned"
    VOID = "void"


class StockItem(Base):
    __tablename__ = "stock_items"
    # Assignment takes the oldest available item of a pool: (pool, status, id) finds it at once.
    __table_args__ = (Index("ix_stock_items_pool_status_id", "pool", "status", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pool: Mapped[str] = mapped_column(String(64))
    # Fernet token of the item (never the item itself): see `whop_autocancel.sealing`.
    content: Mapped[str] = mapped_column(Text)
    # Keyed HMAC of the item: finds duplicates across pools without decrypting anything.
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    # UNIQUE: an order can hold one item at most; NULL while the item is not assigned.
    order_id: Mapped[str | None] = mapped_column(ForeignKey("orders.id"), unique=True, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    voided_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    void_reason: Mapped[str | None] = mapped_column(Text, default=None)
