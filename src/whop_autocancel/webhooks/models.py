"""The webhook inbox: every signed event is stored once, keyed by its `webhook-id`, as
`received`; the `webhooks.apply` job then applies it (`handled`, `ignored` or `failed`)."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from whop_autocancel.db.base import Base, LongText, UTCDateTime

# The longest `object_id` kept (its column): a longer `data.id` is stored as None.
OBJECT_ID_LENGTH = 255


class EventStatus(enum.StrEnum):
    RECEIVED = "received"
    HANDLED = "handled"
    IGNORED = "ignored"
    FAILED = "failed"


class WebhookEvent(Base):
    __tablename__ = "webhook_events"
    __table_args__ = (
        # (A cancellation looks for a refund or dispute waiting to be applied: status and type.)
        Index("ix_webhook_events_status_type", "status", "type"),
        # An apply run reads the oldest waiting events (`received`) in this index's order and
        # stops at the last it takes, instead of sorting every waiting event (a flash sale
        # leaves thousands). It serves every other look-up by status too.
        Index("ix_webhook_events_status_received_at", "status", "received_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100))
    payload: Mapped[str] = mapped_column(LongText)  # the raw body, exactly as signed
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    handled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    # The order the event was applied to (None: not applied, or about no order of ours).
    order_id: Mapped[str | None] = mapped_column(String(40), index=True, default=None)
    # What the event is about, as stored: its `data.id` (the payment's for `payment.*`, the
    # membership's for `membership.*`, …; None: absent, not a string, or too long). The Whop
    # sweep asks it whether a payment's webhook came, applied yet or not.
    object_id: Mapped[str | None] = mapped_column(
        String(OBJECT_ID_LENGTH), index=True, default=None
    )
