"""The cancellation row is the truth about a membership we must cancel; the queue only wakes it."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from whop_autocancel.db.base import Base, UTCDateTime

CANCEL_TASK = "cancellation.run"  # the job that runs one cancellations row


class CancellationStatus(enum.StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    CANCELED = "canceled"
    ALREADY_INACTIVE = "already_inactive"
    FAILED = "failed"
    SKIPPED = "skipped"


FINAL_STATUSES = frozenset(
    {
        CancellationStatus.CANCELED,
        CancellationStatus.ALREADY_INACTIVE,
        CancellationStatus.FAILED,
        CancellationStatus.SKIPPED,
    }
)


class Cancellation(Base):
    __tablename__ = "cancellations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), unique=True)
    membership_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    status: Mapped[str] = mapped_column(String(20), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    # Random, so the Idempotency-Key (`cancel-<token>-<generation>`) is unique across databases
    # and installs on one API key; replaced after a definite refusal (401/403, 409/422).
    idempotency_token: Mapped[str | None] = mapped_column(String(40), default=None)
    generation_started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    last_http_status: Mapped[int | None] = mapped_column(Integer, default=None)
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(100), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class CancellationAttempt(Base):
    """One call to Whop made for a cancellation row, as it was answered: the timeline shows
    every one (the row itself keeps only the last)."""

    __tablename__ = "cancellation_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cancellation_id: Mapped[int] = mapped_column(ForeignKey("cancellations.id"), index=True)
    order_id: Mapped[str] = mapped_column(String(40), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    generation: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)  # the row's attempts after this answer
    request: Mapped[str] = mapped_column(String(100))  # `POST /memberships/{id}/cancel`, …
    membership_id: Mapped[str | None] = mapped_column(String(64), default=None)
    idempotency_key: Mapped[str | None] = mapped_column(String(100), default=None)
    http_status: Mapped[int | None] = mapped_column(Integer, default=None)
    outcome: Mapped[str] = mapped_column(String(30))  # the answer's class (success, retry, …)
    result: Mapped[str] = mapped_column(String(30))  # the row's status after it
    detail: Mapped[str | None] = mapped_column(Text, default=None)
