"""The outbox as the admin sees it (`whop-autocancel emails` and the dashboard's emails page):
what is waiting, what failed, and putting a failed email back to be sent (`emails retry`, the
page's Retry). The body of an email is never read here: it may hold a stock item; nor is a
chat webhook's URL shown: it holds the channel's token."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from whop_autocancel.admin.audit import cli_actor, record
from whop_autocancel.admin.operations import (
    OpsError,
    format_time,
    refusals_audited,  # refusals audited as every admin operation audits them
)
from whop_autocancel.admin.timeline import CHAT_ADDRESS
from whop_autocancel.delivery.service import email_failed_key
from whop_autocancel.mail.models import DELIVERY_KIND, Email
from whop_autocancel.mail.outbox import CHAT_KIND, WAITING
from whop_autocancel.orders.models import Order
from whop_autocancel.runtime import Runtime

log = structlog.get_logger(__name__)

DEFAULT_LIMIT = 50
# A chat message's "address" is the channel's webhook URL, which holds its token.


class EmailStatus(enum.StrEnum):
    PENDING = "pending"  # neither sent nor given up: the outbox is still trying
    FAILED = "failed"  # given up (a 5xx, or a delivery email not accepted in time)
    SENT = "sent"  # accepted by the SMTP server (or the chat webhook)
    ALL = "all"


@dataclass(frozen=True)
class EmailRow:
    id: int
    kind: str
    order_id: str | None
    to: str
    subject: str
    attempts: int
    next_attempt_at: datetime | None  # None once it is sent or given up
    last_error: str | None  # the SMTP server's last answer (or the connection error)
    created_at: datetime  # when it was queued (or put back by `emails retry`)
    sent_at: datetime | None
    failed_at: datetime | None
    # Its order's status, read by `list_emails` (None for an email of no order, and as read
    # by `emails retry`, which locks the email row alone).
    order_status: str | None = None

    @property
    def status(self) -> str:
        if self.sent_at is not None:
            return EmailStatus.SENT.value
        if self.failed_at is not None:
            return EmailStatus.FAILED.value
        return EmailStatus.PENDING.value


_COLUMNS = (
    Email.id,
    Email.kind,
    Email.order_id,
    Email.to_address,
    Email.subject,
    Email.attempts,
    Email.next_attempt_at,
    Email.last_error,
    Email.created_at,
    Email.sent_at,
    Email.failed_at,
)


def _filter(status: str | None) -> list[Any]:
    """Default (None): what still needs the outbox or a human, pending and failed."""
    if status is None:
        return [Email.sent_at.is_(None)]
    if status == EmailStatus.PENDING.value:
        return [WAITING]  # (the outbox's index: not `failed_at IS NULL`, every email sent)
    if status == EmailStatus.FAILED.value:
        return [Email.failed_at.is_not(None)]
    if status == EmailStatus.SENT.value:
        return [Email.sent_at.is_not(None)]
    if status == EmailStatus.ALL.value:
        return []
    valid = ", ".join(member.value for member in EmailStatus)
    raise OpsError(f"unknown status {status!r}; valid statuses: {valid}")


def list_emails(
    session: Session, *, status: str | None = None, limit: int = DEFAULT_LIMIT
) -> list[EmailRow]:
    """Emails newest first (pending and failed unless `status` says otherwise); only the
    columns listed are read, never a body."""
    if limit < 1:
        raise OpsError(f"limit must be at least 1, not {limit}")
    rows = session.execute(
        select(*_COLUMNS, Order.status.label("order_status"))
        .outerjoin(Order, Order.id == Email.order_id)
        .where(*_filter(status))
        .order_by(Email.created_at.desc(), Email.id.desc())
        .limit(limit)
    ).all()
    return [_email_row(row, row.order_status) for row in rows]


def _email_row(row: Any, order_status: str | None = None) -> EmailRow:
    return EmailRow(
        id=row.id,
        kind=row.kind,
        order_id=row.order_id,
        to=CHAT_ADDRESS if row.kind == CHAT_KIND else row.to_address,
        subject=row.subject,
        attempts=row.attempts,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        created_at=row.created_at,
        sent_at=row.sent_at,
        failed_at=row.failed_at,
        order_status=order_status,
    )


@dataclass(frozen=True)
class RetriedEmail:
    id: int
    kind: str
    order_id: str | None
    to: str
    previous_error: str | None


def retry_email(runtime: Runtime, email_id: int, *, actor: str | None = None) -> RetriedEmail:
    """Put a failed email back to be sent (the outbox's own `requeue`: its `mail.send` job
    wakes the row, and an accepted delivery email wakes its order's held cancellation as any
    sent one does), resolve its `email_failed` alert (failing again alerts again), and record
    it in the audit table, in one transaction. Refused, and the refusal audited, for an email
    that was sent or is still being tried."""
    with refusals_audited(runtime, actor, "email.retry", f"#{email_id}"):
        return _retry(runtime, email_id, actor or cli_actor())


def _retry(runtime: Runtime, email_id: int, actor: str) -> RetriedEmail:
    now = runtime.clock.now()
    with runtime.database.transaction() as session:
        found = session.execute(
            select(*_COLUMNS).where(Email.id == email_id).with_for_update()
        ).first()
        if found is None:
            raise OpsError(f"no email #{email_id} (see `whop-autocancel emails`)")
        row = _email_row(found)
        if row.sent_at is not None:
            hint = (
                f"; `whop-autocancel orders resend {row.order_id}` sends a new one"
                if row.kind == DELIVERY_KIND and row.order_id
                else ""
            )
            raise OpsError(
                f"email #{email_id} was sent at {format_time(row.sent_at)}: only failed "
                f"emails are retried{hint}"
            )
        if row.failed_at is None or not runtime.outbox.requeue(session, email_id, now):
            raise OpsError(
                f"email #{email_id} is pending: the outbox is still trying it (next attempt "
                f"{format_time(row.next_attempt_at)}); only failed emails are retried"
            )
        runtime.alerts.resolve(session, email_failed_key(email_id), now)
        record(
            session,
            at=now,
            actor=actor,
            action="email.retry",
            target=f"#{email_id}",
            order_id=row.order_id,
            # The row now reads as queued anew: what it was is kept here, on the timeline.
            detail=(
                f"{row.kind} to {row.to}, first queued at {format_time(row.created_at)}, "
                f"{row.attempts} attempt(s), failed at {format_time(row.failed_at)}: "
                f"{row.last_error or '-'}"
            )[:500],
        )
    log.warning("email_retried", email_id=email_id, kind=row.kind, order_id=row.order_id)
    return RetriedEmail(
        id=email_id,
        kind=row.kind,
        order_id=row.order_id,
        to=row.to,
        previous_error=row.last_error,
    )


def failed_email_ids(session: Session) -> list[int]:
    """Every failed email, oldest first (the order `emails retry --all-failed` goes in)."""
    return list(
        session.scalars(select(Email.id).where(Email.failed_at.is_not(None)).order_by(Email.id))
    )
