"""Orders: one per purchase."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from whop_autocancel.db.base import Base, UTCDateTime


class OrderStatus(enum.StrEnum):
    PENDING = "pending"
    PAID = "paid"
    DELIVERED = "delivered"
    DELIVERY_FAILED = "delivery_failed"
    REFUNDED = "refunded"
    DISPUTED = "disputed"
    # Closed without a payment: its Whop checkout could not be created, or nobody paid within
    # PENDING_ORDER_TTL. No guess (the window rule) ever binds a payment to it again.
    ABANDONED = "abandoned"


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    whop_payment_id: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    whop_membership_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    checkout_configuration_id: Mapped[str | None] = mapped_column(
        String(64), index=True, default=None
    )
    plan_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    product_id: Mapped[str | None] = mapped_column(String(64), default=None)
    whop_user_id: Mapped[str | None] = mapped_column(String(64), default=None)
    email: Mapped[str | None] = mapped_column(String(320), default=None)
    billing_reason: Mapped[str | None] = mapped_column(String(40), default=None)
    status: Mapped[str] = mapped_column(String(20), index=True)
    amount: Mapped[str | None] = mapped_column(String(32), default=None)  # exact decimal text
    currency: Mapped[str | None] = mapped_column(String(8), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    payment_created_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    delivery_method: Mapped[str | None] = mapped_column(String(64), default=None)
    delivery_error: Mapped[str | None] = mapped_column(Text, default=None)
    # The stock pool this order waits for (delivery_failed for want of stock); None otherwise.
    waiting_for_stock: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    # Which matching rule bound the payment to this order (DESIGN §5), for the timeline.
    matched_by: Mapped[str | None] = mapped_column(String(100), default=None)
    order_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
