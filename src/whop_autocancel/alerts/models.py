"""Admin alerts: one row per thing a human must know, deduplicated by key."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from whop_autocancel.db.base import Base, UTCDateTime

DEDUPE_KEY_LENGTH = 200  # the column's length (a resolved alert's freed key is cut to it)


class AlertKind(enum.StrEnum):
    CANCELLATION_FAILED = "cancellation_failed"
    DELIVERY_FAILED = "delivery_failed"
    WHOP_AUTH = "whop_auth"
    WHOP_UNREACHABLE = "whop_unreachable"
    PLAN_NOT_ONE_TIME = "plan_not_one_time"
    EVENT_APPLY_FAILED = "event_apply_failed"
    LOW_STOCK = "low_stock"
    OUT_OF_STOCK = "out_of_stock"
    WEBHOOK_SIGNATURE_FAILURES = "webhook_signature_failures"
    MISSED_WEBHOOKS_RECOVERED = "missed_webhooks_recovered"
    ORDER_REFUNDED = "order_refunded"
    ORDER_DISPUTED = "order_disputed"
    BINDING_CONFLICT = "binding_conflict"
    EMAIL_FAILED = "email_failed"


class Alert(Base):
    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(50), index=True)
    dedupe_key: Mapped[str] = mapped_column(String(DEDUPE_KEY_LENGTH), unique=True)
    subject: Mapped[str] = mapped_column(String(300))
    text_body: Mapped[str] = mapped_column(Text)
    order_id: Mapped[str | None] = mapped_column(ForeignKey("orders.id"), index=True, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # When an email/chat message about it went out (itself or in a digest); None: folded and
    # waiting for its kind's next digest. Indexed: every stuck-work sweep looks for the folded
    # ones, few among every alert ever raised.
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True, default=None)
