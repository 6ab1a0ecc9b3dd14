"""What the service's own database says after a run: per purchase, when each step happened,
and the counts the end-to-end sections check (orders, delivery emails, cancellations, alerts).

Read through the service's own models, so that the queries follow its schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select

from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.db.engine import Database
from whop_autocancel.mail.models import DELIVERY_KIND, Email
from whop_autocancel.orders.models import Order


@dataclass
class Steps:
    """One purchase's steps in the service (its clock, Unix seconds); None: not reached."""

    delivered_at: float | None = None
    email_sent_at: float | None = None  # the delivery email, accepted by the SMTP server
    canceled_at: float | None = None  # the cancellation row's (after Whop's answer)


def _unix(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


def steps_by_membership(url: str) -> dict[str, Steps]:
    """Each order's steps, by its Whop membership id."""
    database = Database(url)
    try:
        with database.transaction() as session:
            rows = session.execute(
                select(
                    Order.whop_membership_id,
                    Order.delivered_at,
                    Email.sent_at,
                    Cancellation.canceled_at,
                )
                .outerjoin(Email, (Email.order_id == Order.id) & (Email.kind == DELIVERY_KIND))
                .outerjoin(Cancellation, Cancellation.order_id == Order.id)
                .where(Order.whop_membership_id.is_not(None))
            ).all()
    finally:
        database.dispose()
    return {
        membership: Steps(_unix(delivered), _unix(sent), _unix(canceled))
        for membership, delivered, sent, canceled in rows
    }


#: Cancellation statuses that end a row (nothing more will happen to it by itself).
FINAL = ("canceled", "already_inactive", "failed", "skipped")


def open_work(url: str) -> set[str]:
    """The membership ids of orders whose cancellation has not ended yet (none made yet, or
    one still scheduled or running): work the service still holds."""
    database = Database(url)
    try:
        with database.transaction() as session:
            rows = session.scalars(
                select(Order.whop_membership_id)
                .outerjoin(Cancellation, Cancellation.order_id == Order.id)
                .where(
                    Order.whop_membership_id.is_not(None),
                    (Cancellation.id.is_(None)) | (Cancellation.status.not_in(FINAL)),
                )
            ).all()
    finally:
        database.dispose()
    return {membership for membership in rows if membership is not None}


@dataclass
class Counts:
    """The service's tallies after a run."""

    orders: int = 0
    orders_paid: int = 0  # orders bound to a payment
    distinct_payments: int = 0
    delivery_emails: int = 0  # rows of kind `delivery`
    delivery_emails_sent: int = 0
    delivery_emails_failed: int = 0
    buyers_with_more_than_one_delivery: int = 0
    # Plain dicts, not Counters: dataclasses.asdict rebuilds a Counter from its items.
    cancellations: dict[str, int] = field(default_factory=dict)  # by status
    alerts: dict[str, int] = field(default_factory=dict)  # by kind
    unsent_emails: int = 0  # any kind, neither sent nor failed


def counts(url: str) -> Counts:
    database = Database(url)
    result = Counts()
    try:
        with database.transaction() as session:

            def scalar(statement: object) -> int:
                return int(session.scalar(statement) or 0)  # type: ignore[call-overload]

            result.orders = scalar(select(func.count()).select_from(Order))
            result.orders_paid = scalar(
                select(func.count()).select_from(Order).where(Order.whop_payment_id.is_not(None))
            )
            result.distinct_payments = scalar(
                select(func.count(func.distinct(Order.whop_payment_id)))
            )
            delivery = Email.kind == DELIVERY_KIND
            result.delivery_emails = scalar(select(func.count()).select_from(Email).where(delivery))
            result.delivery_emails_sent = scalar(
                select(func.count()).select_from(Email).where(delivery, Email.sent_at.is_not(None))
            )
            result.delivery_emails_failed = scalar(
                select(func.count())
                .select_from(Email)
                .where(delivery, Email.failed_at.is_not(None))
            )
            per_buyer = (
                select(Email.to_address)
                .where(delivery)
                .group_by(Email.to_address)
                .having(func.count() > 1)
                .subquery()
            )
            result.buyers_with_more_than_one_delivery = scalar(
                select(func.count()).select_from(per_buyer)
            )
            result.unsent_emails = scalar(
                select(func.count())
                .select_from(Email)
                .where(Email.sent_at.is_(None), Email.failed_at.is_(None))
            )
            result.cancellations = {
                status: int(count)
                for status, count in session.execute(
                    select(Cancellation.status, func.count()).group_by(Cancellation.status)
                )
            }
            result.alerts = {
                kind: int(count)
                for kind, count in session.execute(
                    select(Alert.kind, func.count()).group_by(Alert.kind)
                )
            }
    finally:
        database.dispose()
    return result
