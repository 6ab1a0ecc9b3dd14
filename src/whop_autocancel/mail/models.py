"""The outbound email outbox: a row is written with the state change that causes it."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Table, Text, false, text
from sqlalchemy.orm import Mapped, mapped_column

from whop_autocancel.db.base import Base, LongText, UTCDateTime

# The kind of a customer's delivery email (the first one and every `orders resend`): the
# order's membership is cancelled only once one of them was accepted by the SMTP server, and
# only these are given up after EMAIL_GIVE_UP_AFTER.
DELIVERY_KIND = "delivery"


class Email(Base):
    __tablename__ = "emails"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dedupe_key: Mapped[str | None] = mapped_column(String(200), unique=True, default=None)
    kind: Mapped[str] = mapped_column(String(50), index=True)
    to_address: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(String(300))
    text_body: Mapped[str] = mapped_column(LongText)
    html_body: Mapped[str | None] = mapped_column(LongText, default=None)
    # The bodies are Fernet tokens (the email carries a stock item): see `sealing.py`.
    sealed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    order_id: Mapped[str | None] = mapped_column(ForeignKey("orders.id"), index=True, default=None)
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id"), index=True, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When it is due (queued, or retried): NULL once it is sent or given up, so that this
    # index holds only the messages still waiting, and finding the due ones never reads the
    # emails done (every one ever sent, every one given up). See `__table_args__`.
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True, default=None)
    # Given up: the SMTP server rejected it permanently (5xx), or did not accept it within
    # EMAIL_GIVE_UP_AFTER. Never retried by itself; `orders resend` queues a new one.
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)

    # On PostgreSQL the index holds only the emails not done (sent or given up). Without
    # statistics (a fresh install's first sale, before autovacuum's first round; or autovacuum
    # off) its planner guesses a third of an index for a range and judges the cost by the
    # rows it would fetch: with every email ever sent in it, a scan and sort of the whole
    # table looked cheaper, at every claim. An index of the unsent it takes for what it is.
    # Done emails a version before 0011 left a next attempt on are out of it too, so there
    # `clear_done_emails` has nothing to do (`due_index_leaves_out_done`). SQLite plans the
    # range on the index as it is (test_query_plans); MariaDB's InnoDB keeps statistics of
    # its own, updated as rows change.
    __table_args__ = (
        Index(
            "ix_emails_next_attempt_at",
            "next_attempt_at",
            postgresql_where=text("coalesce(failed_at, sent_at) IS NULL"),
        ),
    )


def due_index_leaves_out_done(dialect: str) -> bool:
    """Whether, on `dialect`, the `next_attempt_at` index holds only the emails not done (its
    definition above has a condition there)."""
    table = cast(Table, Email.__table__)
    [index] = [i for i in table.indexes if i.name == "ix_emails_next_attempt_at"]
    return index.dialect_kwargs.get(f"{dialect}_where") is not None
