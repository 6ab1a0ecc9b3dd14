"""What the dashboard's overview shows, read from the database (the rows are the truth): hourly
activity for a week, how far behind the work is, the periodic sweeps, open alerts; and the
listings of the purchases and cancellations pages (the emails page lists with `admin/emails.py`,
as the `emails` command does). Functions of a session; nothing here writes.

The hourly counts are grouped by the database itself, with each backend's own way of writing
an hour (`strftime` on SQLite, `to_char` on PostgreSQL, `DATE_FORMAT` on MariaDB): times are
stored as naive UTC, so the hour is UTC's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from whop_autocancel.admin.operations import OrderListing
from whop_autocancel.alerts.models import Alert, AlertKind
from whop_autocancel.cancellation.models import Cancellation, CancellationStatus
from whop_autocancel.db import leases
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.outbox import WAITING
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import ONE_TIME
from whop_autocancel.reconcile.sweeps import STUCK_SWEEP_LEASE
from whop_autocancel.reconcile.whop_sweep import PAYMENTS_WATERMARK, WHOP_SWEEP_LEASE
from whop_autocancel.webhooks.models import EventStatus, WebhookEvent

HOURS = 7 * 24
# Alerts that say something failed (the others inform: a refund, low stock, a recovery).
FAILURE_KINDS = (
    AlertKind.CANCELLATION_FAILED,
    AlertKind.DELIVERY_FAILED,
    AlertKind.EMAIL_FAILED,
    AlertKind.EVENT_APPLY_FAILED,
    AlertKind.WHOP_AUTH,
    AlertKind.WHOP_UNREACHABLE,
    AlertKind.OUT_OF_STOCK,
    AlertKind.BINDING_CONFLICT,
    AlertKind.WEBHOOK_SIGNATURE_FAILURES,
)
SERIES = ("purchases", "deliveries", "cancellations", "failures")


# Hourly activity ------------------------------------------------------------------------------


def _hour_of(session: Session, column: Any) -> ColumnElement[str]:
    """`YYYY-MM-DD HH` of a stored (naive UTC) time, written by the database."""
    backend = session.get_bind().dialect.name
    if backend == "sqlite":
        return func.strftime("%Y-%m-%d %H", column)
    if backend == "postgresql":
        return func.to_char(column, "YYYY-MM-DD HH24")
    return func.date_format(column, "%Y-%m-%d %H")  # MariaDB / MySQL


@dataclass(frozen=True)
class Activity:
    """Counts per hour, oldest first: `hours[i]` is the start of the hour of `counts[s][i]`."""

    hours: list[datetime]
    counts: dict[str, list[int]]

    def total(self, series: str) -> int:
        return sum(self.counts[series])


def _grouped(
    session: Session, column: InstrumentedAttribute[Any], since: datetime, *where: Any
) -> dict[str, int]:
    bucket = _hour_of(session, column).label("hour")
    statement = (
        select(bucket, func.count())
        .where(column.is_not(None), column >= since, *where)
        .group_by(bucket)
    )
    return {str(hour): int(count) for hour, count in session.execute(statement)}


def hourly_activity(session: Session, now: datetime, hours: int = HOURS) -> Activity:
    """Purchases (orders paid), deliveries, cancellations (memberships we cancelled) and
    failures (alerts of a failure kind) per hour, for the `hours` up to and including now's."""
    current = now.replace(minute=0, second=0, microsecond=0)
    starts = [current - timedelta(hours=hours - 1 - index) for index in range(hours)]
    since = starts[0]
    grouped = {
        "purchases": _grouped(session, Order.paid_at, since),
        "deliveries": _grouped(session, Order.delivered_at, since),
        "cancellations": _grouped(
            session,
            Cancellation.canceled_at,
            since,
            Cancellation.status == CancellationStatus.CANCELED.value,
        ),
        "failures": _grouped(
            session,
            Alert.created_at,
            since,
            Alert.kind.in_([kind.value for kind in FAILURE_KINDS]),
        ),
    }
    keys = [start.strftime("%Y-%m-%d %H") for start in starts]
    return Activity(
        hours=starts,
        counts={name: [grouped[name].get(key, 0) for key in keys] for name in SERIES},
    )


# Queue lag -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backlog:
    """Work that is due and not done: how much, and how long the oldest has waited."""

    name: str
    count: int
    oldest: datetime | None

    def lag(self, now: datetime) -> float:
        return max(0.0, (now - self.oldest).total_seconds()) if self.oldest else 0.0


def _backlog(session: Session, name: str, column: Any, *where: Any) -> Backlog:
    count, oldest = session.execute(select(func.count(), func.min(column)).where(*where)).one()
    return Backlog(name, int(count), oldest)


def backlogs(session: Session, now: datetime, listed_plans: Sequence[str]) -> list[Backlog]:
    """Due work by kind, from the rows (the queue only wakes them up): a lag that grows means
    no worker is taking it. A paid order is due for delivery only if it is a one-time purchase
    of a plan the catalog lists (`listed_plans`); the others are recorded only."""
    return [
        _backlog(
            session,
            "cancellations due",
            Cancellation.next_attempt_at,
            Cancellation.status == CancellationStatus.SCHEDULED.value,
            Cancellation.next_attempt_at <= now,
        ),
        _backlog(
            session,
            "emails due",
            Email.next_attempt_at,
            WAITING,
            Email.next_attempt_at <= now,
        ),
        _backlog(
            session,
            "paid, not delivered",
            Order.paid_at,
            Order.status == OrderStatus.PAID.value,
            Order.billing_reason == ONE_TIME,
            Order.plan_id.in_(list(listed_plans)),
        ),
        _backlog(
            session,
            "waiting for stock",
            Order.paid_at,
            Order.status == OrderStatus.DELIVERY_FAILED.value,
            Order.waiting_for_stock.is_not(None),
        ),
        _backlog(
            session,
            "events failing to apply",
            WebhookEvent.received_at,
            WebhookEvent.status == EventStatus.FAILED.value,
        ),
    ]


# Sweeps and workers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Sweeps:
    stuck_lease_until: datetime | None  # a sweep takes its lease for 0.9 of its interval
    whop_lease_until: datetime | None
    whop_payments_until: datetime | None  # the Whop sweep has listed payments up to here
    latest_heartbeat: datetime | None
    workers_alive: int


def sweeps(session: Session, now: datetime, heartbeat_max_age: float) -> Sweeps:
    alive_since = now - timedelta(seconds=heartbeat_max_age)
    workers = session.execute(
        select(func.count()).where(
            leases.Lease.key.startswith(leases.HEARTBEAT_PREFIX), leases.Lease.until >= alive_since
        )
    ).scalar_one()
    return Sweeps(
        stuck_lease_until=leases.read_until(session, STUCK_SWEEP_LEASE),
        whop_lease_until=leases.read_until(session, WHOP_SWEEP_LEASE),
        whop_payments_until=leases.read_until(session, PAYMENTS_WATERMARK),
        latest_heartbeat=leases.latest_heartbeat(session),
        workers_alive=int(workers),
    )


def sweep_started(lease_until: datetime | None, interval: float) -> datetime | None:
    """When the sweep that holds (or held) this lease started: it takes the lease for 0.9 of
    its interval (`reconcile/sweeps.py`, `reconcile/whop_sweep.py`)."""
    return None if lease_until is None else lease_until - timedelta(seconds=interval * 0.9)


# Alerts, purchases, cancellations ------------------------------------------------------------


@dataclass(frozen=True)
class OpenAlerts:
    total: int
    newest: list[Alert] = field(default_factory=list)


def open_alerts(session: Session, limit: int = 20) -> OpenAlerts:
    """Alerts not resolved, newest first (an incident resolves itself; most alerts stay open
    as the record of what happened)."""
    total = session.execute(
        select(func.count()).select_from(Alert).where(Alert.resolved_at.is_(None))
    ).scalar_one()
    newest = session.scalars(
        select(Alert)
        .where(Alert.resolved_at.is_(None))
        .order_by(Alert.created_at.desc(), Alert.id.desc())
        .limit(limit)
    ).all()
    return OpenAlerts(int(total), list(newest))


def orders_by_ids(session: Session, order_ids: Sequence[str]) -> list[OrderListing]:
    """These orders, in the order given, each with its cancellation row if it has one."""
    if not order_ids:
        return []
    rows = session.execute(
        select(Order, Cancellation)
        .outerjoin(Cancellation, Cancellation.order_id == Order.id)
        .where(Order.id.in_(list(order_ids)))
    ).all()
    found = {order.id: OrderListing(order, cancellation) for order, cancellation in rows}
    return [found[order_id] for order_id in order_ids if order_id in found]


def recent_cancellations(
    session: Session, *, limit: int = 50, statuses: Sequence[str] = ()
) -> list[tuple[Cancellation, Order]]:
    """Cancellations, the most recently changed first, with their orders."""
    statement = select(Cancellation, Order).join(Order, Order.id == Cancellation.order_id)
    if statuses:
        statement = statement.where(Cancellation.status.in_(list(statuses)))
    rows = session.execute(
        statement.order_by(Cancellation.updated_at.desc(), Cancellation.id.desc()).limit(limit)
    ).all()
    return [(cancellation, order) for cancellation, order in rows]
