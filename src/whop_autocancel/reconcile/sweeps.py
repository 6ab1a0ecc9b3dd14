"""The stuck-work sweep (no Whop call): whatever a killed worker or a lost job left behind is
enqueued again. Runs at start-up and every `SWEEP_INTERVAL` under a database lease, so any
number of workers can run the schedule and only one does each tick."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Select, and_, func, or_, select, true
from sqlalchemy.orm import Session

from whop_autocancel.alerts.models import Alert, AlertKind
from whop_autocancel.alerts.service import AlertContent, Alerts
from whop_autocancel.cancellation.models import CANCEL_TASK, Cancellation, CancellationStatus
from whop_autocancel.catalog import Catalog
from whop_autocancel.clock import Clock
from whop_autocancel.db import leases
from whop_autocancel.db.engine import Database
from whop_autocancel.delivery.stock import SERVE_TASK, follow_renamed_pools, pools_to_serve
from whop_autocancel.jobs import Jobs
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.outbox import SEND_TASK, clear_done_emails, unsent_due
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import DELIVER_TASK, ONE_TIME, close_unpaid_orders
from whop_autocancel.webhooks.inbox import (
    APPLY_TASK,
    REAPPLY_TASK,
    due_failed_events,
    unapplied_events,
)

log = structlog.get_logger(__name__)

STUCK_SWEEP_LEASE = "sweep:stuck"
BATCH = 500
# Jobs ready on the queue from which it is working through a backlog (a flash sale): overdue
# deliveries and emails are then waiting their turn there, not lost, and are not queued again
# (each would run twice over, by a worker already behind) until the queue has drained.
QUEUE_BUSY = 50


AUTH_ALERT_LISTED = 50


def alert_paused_for_auth(session: Session, alerts: Alerts, now: datetime) -> None:
    """Cancellations paused by a 401/403: one `whop_auth` alert (an incident, open until a
    cancel works again) that lists the affected orders, not one alert per order."""
    # A cancel that worked resolved the last incident: rows paused before that are only
    # waiting for their next try, and must not open a new one.
    resolved = session.scalar(
        select(func.max(Alert.resolved_at)).where(Alert.kind == AlertKind.WHOP_AUTH.value)
    )
    paused = session.execute(
        select(Cancellation, Order)
        .join(Order, Order.id == Cancellation.order_id)
        .where(
            Cancellation.status == CancellationStatus.SCHEDULED.value,
            Cancellation.last_http_status.in_((401, 403)),
            Cancellation.updated_at > resolved if resolved is not None else true(),
        )
        .order_by(Cancellation.id)
        .limit(500)
    ).all()
    if not paused:
        return
    details = [
        (order.id, f"{row.membership_id or '-'} · {order.email or 'unknown customer'}")
        for row, order in paused[:AUTH_ALERT_LISTED]
    ]
    if len(paused) > AUTH_ALERT_LISTED:
        details.append(("…", f"and {len(paused) - AUTH_ALERT_LISTED} more"))
    alerts.open_incident(
        session,
        AlertKind.WHOP_AUTH,
        AlertContent(
            subject="Whop refused the API key: membership cancellations are paused",
            summary=(
                f"Whop answered {paused[0][0].last_error}. Nothing has failed: the "
                f"{len(paused)} cancellation(s) below are paused and resume by themselves once "
                "the key works."
            ),
            details=details,
            steps=[
                "In Whop: Dashboard → Developer → API keys, check the key in WHOP_API_KEY.",
                "Give it the permission named above (or create a new key, update WHOP_API_KEY "
                "and restart).",
            ],
        ),
        now,
    )


@dataclass(frozen=True)
class SweepReport:
    ran: bool
    cancellations: int = 0
    deliveries: int = 0
    emails: int = 0
    events: int = 0  # failed ones due for another try, and received ones never applied
    digests: int = 0
    stock_pools: int = 0  # pools whose waiting orders are served again
    abandoned: int = 0  # pending orders nobody paid within PENDING_ORDER_TTL, closed
    queue_busy: bool = False  # QUEUE_BUSY jobs or more ready: deliveries and emails left

    @property
    def total(self) -> int:
        return self.cancellations + self.deliveries + self.emails + self.events + self.stock_pools


class StuckWorkSweep:
    def __init__(
        self,
        database: Database,
        catalog: Catalog,
        jobs: Jobs,
        alerts: Alerts,
        clock: Clock,
        *,
        owner: str,
        interval: float,
        grace: float,
        pending_ttl: float,
    ) -> None:
        self._database = database
        self._catalog = catalog
        self._jobs = jobs
        self._alerts = alerts
        self._clock = clock
        self._owner = owner
        self._interval = interval
        self._grace = grace
        self._pending_ttl = pending_ttl

    def _queue_busy(self) -> bool:
        """Whether QUEUE_BUSY jobs or more are ready (False when the queue cannot say: the
        sweep then queues again as always)."""
        try:
            return self._jobs.backlog().ready >= QUEUE_BUSY
        except Exception as error:  # the queue is down: enqueueing fails anyway, and says so
            log.warning("stuck_sweep_queue_unreadable", error=type(error).__name__)
            return False

    def run(self, *, force: bool = False, dry_run: bool = False) -> SweepReport:
        """One tick: skipped when another worker holds this tick's lease (unless `force`).
        `dry_run` counts what it would enqueue and changes nothing."""
        now = self._clock.now()
        overdue = now - timedelta(seconds=self._grace)
        skip_locked = self._database.skip_locked
        busy = self._queue_busy()

        def candidates(statement: Select[Any]) -> list[Any]:
            if skip_locked:  # rows a job is updating right now are being handled already
                statement = statement.with_for_update(skip_locked=True)
            return list(session.scalars(statement.limit(BATCH)))

        with self._database.transaction() as session:
            if not (force or dry_run) and not leases.try_acquire(
                session, STUCK_SWEEP_LEASE, self._owner, now, self._interval * 0.9
            ):
                return SweepReport(ran=False)
            cancellations = candidates(
                select(Cancellation.id).where(
                    or_(
                        and_(
                            Cancellation.status == CancellationStatus.SCHEDULED.value,
                            Cancellation.next_attempt_at < overdue,
                        ),
                        and_(
                            Cancellation.status == CancellationStatus.RUNNING.value,
                            Cancellation.lease_until < now,
                        ),
                    )
                )
            )
            listed = list(self._catalog.plans)
            deliveries = (
                []
                if busy
                else candidates(
                    select(Order.id).where(
                        Order.status == OrderStatus.PAID.value,
                        Order.billing_reason == ONE_TIME,
                        Order.plan_id.in_(listed),
                        Order.paid_at < overdue,
                    )
                )
                if listed
                else []
            )
            emails = (
                []
                if busy
                # (Given up, `failed`: only `orders resend` sends it again.)
                else candidates(select(Email.id).where(unsent_due(overdue, now)))
            )
            events = due_failed_events(session, now, BATCH)
            # Stored webhooks never applied: their apply job was lost (the queue was down, the
            # web process died between its commit and the enqueue, a worker was killed).
            unapplied = unapplied_events(session, overdue, BATCH)
            if not dry_run:
                follow_renamed_pools(session, self._catalog)
            pools = pools_to_serve(session)
            if dry_run:
                return SweepReport(
                    ran=True,
                    cancellations=len(cancellations),
                    deliveries=len(deliveries),
                    emails=len(emails),
                    events=len(events) + len(unapplied),
                    stock_pools=len(pools),
                    queue_busy=busy,
                )
            leases.forget_heartbeats_before(session, now - timedelta(days=1))
            clear_done_emails(session, overdue)
            abandoned = close_unpaid_orders(
                session, now - timedelta(seconds=self._pending_ttl), BATCH
            )
            alert_paused_for_auth(session, self._alerts, now)
            digests = self._alerts.flush_digests(session, now)
            for cancellation_id in cancellations:
                self._jobs.defer(session, CANCEL_TASK, cancellation_id)
            for order_id in deliveries:
                self._jobs.defer(session, DELIVER_TASK, order_id)
            for email_id in emails:
                self._jobs.defer(session, SEND_TASK, email_id)
            for event_id in events:
                self._jobs.defer(session, REAPPLY_TASK, event_id)
            if unapplied:  # one job applies them all, oldest first
                self._jobs.defer(session, APPLY_TASK)
            for pool in pools:
                self._jobs.defer(session, SERVE_TASK, pool)
        report = SweepReport(
            ran=True,
            cancellations=len(cancellations),
            deliveries=len(deliveries),
            emails=len(emails),
            events=len(events) + len(unapplied),
            digests=digests,
            stock_pools=len(pools),
            abandoned=len(abandoned),
            queue_busy=busy,
        )
        if busy:
            log.info("stuck_sweep_leaves_work_to_busy_queue", queue_busy_at=QUEUE_BUSY)
        if abandoned:
            log.info("pending_orders_abandoned", count=len(abandoned), order_ids=abandoned[:20])
        if report.total:
            log.warning(
                "stuck_work_requeued",
                cancellations=report.cancellations,
                deliveries=report.deliveries,
                emails=report.emails,
                events=report.events,
                stock_pools=report.stock_pools,
            )
        return report
