"""`GET /metrics` and the figures that are the truth in the database (and the queue), read at
scrape time: every web process reports the same global numbers, whichever process did the work.

The queries are grouped counts and minimums on indexed columns, restricted to the rows that
stay few (unsent and failed email, open cancellations, failed events, open alerts); what grows
for ever (sent email, finished cancellations) is counted by the process counters in
`whop_autocancel.metrics` instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from whop_autocancel import metrics
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation, CancellationStatus
from whop_autocancel.clock import utc
from whop_autocancel.db.base import not_searched
from whop_autocancel.delivery.stock import stock_levels
from whop_autocancel.mail.models import Email
from whop_autocancel.mail.outbox import WAITING
from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.service import ONE_TIME
from whop_autocancel.runtime import Runtime
from whop_autocancel.webhooks.models import EventStatus, WebhookEvent

log = structlog.get_logger(__name__)

P = metrics.PREFIX
# Cancellation states reported as rows: the open ones and those waiting for an admin. The
# finished ones grow with every sale: `whop_autocancel_cancellations_total` counts those.
OPEN_CANCELLATION_STATES = (
    CancellationStatus.SCHEDULED.value,
    CancellationStatus.RUNNING.value,
    CancellationStatus.FAILED.value,
)
# Webhook events not applied (yet): the applied ones grow with every sale.
OPEN_EVENT_STATES = (EventStatus.RECEIVED.value, EventStatus.FAILED.value)


def _gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{P}_{name}", documentation, labels=labels)


def _age(now: datetime, moment: datetime | None) -> float:
    """Seconds `moment` lies in the past (0 when it is not, or there is none)."""
    return max(0.0, (now - utc(moment)).total_seconds()) if moment is not None else 0.0


class DatabaseCollector:
    """Gauges read at scrape time from the database and the queue. A part that cannot be read
    reports `whop_autocancel_collector_up{part} 0` instead of failing the scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        up = _gauge(
            "collector_up", "1 when the part could be read at this scrape, else 0.", ["part"]
        )
        families: list[Metric] = []
        for part, read in (("database", self._database), ("queue", self._queue)):
            try:
                families.extend(read())
            except Exception as error:
                log.warning("metrics_part_unreadable", part=part, error=type(error).__name__)
                up.add_metric([part], 0)
            else:
                up.add_metric([part], 1)
        yield from families
        yield up

    # The queue ------------------------------------------------------------------------------

    def _queue(self) -> list[Metric]:
        backlog = self._runtime.jobs.backlog()
        jobs = _gauge(
            "queue_jobs",
            "Jobs in the queue: ready (waiting for a worker thread) or scheduled (delayed).",
            ["state"],
        )
        jobs.add_metric(["ready"], backlog.ready)
        jobs.add_metric(["scheduled"], backlog.scheduled)
        oldest = _gauge(
            "queue_oldest_job_age_seconds",
            "How long the most overdue job has waited past its due time (delayed jobs only: "
            "jobs enqueued to run at once carry no time; see queue_jobs and overdue_work_seconds).",
        )
        oldest.add_metric([], backlog.oldest_due_age)
        return [jobs, oldest]

    # The database ---------------------------------------------------------------------------

    def _database(self) -> list[Metric]:
        runtime = self._runtime
        now = runtime.clock.now()
        with runtime.database.transaction() as session:
            return [
                *self._stock(session),
                *self._emails(session, now),
                *self._cancellations(session, now),
                self._overdue(session, now),
                self._events(session),
                *self._alerts(session),
            ]

    def _stock(self, session: Session) -> list[Metric]:
        items = _gauge(
            "stock_items",
            "Stock items by pool and state (available, assigned, void).",
            ["pool", "state"],
        )
        threshold = _gauge(
            "stock_low_threshold",
            "The pool's low_stock threshold: a low_stock alert at this many available or fewer.",
            ["pool"],
        )
        waiting = _gauge(
            "stock_waiting_orders", "Paid orders waiting for the pool to be refilled.", ["pool"]
        )
        for level in stock_levels(session, self._runtime.catalog):
            items.add_metric([level.pool, "available"], level.available)
            items.add_metric([level.pool, "assigned"], level.assigned)
            items.add_metric([level.pool, "void"], level.void)
            threshold.add_metric([level.pool], level.threshold)
            waiting.add_metric([level.pool], level.waiting)
        return [items, threshold, waiting]

    def _emails(self, session: Session, now: datetime) -> list[Metric]:
        rows = _gauge(
            "email_rows",
            "Outbox messages not sent: pending (being retried) or failed (given up for good), "
            "by kind (delivery, admin_delivered, alert, chat).",
            ["kind", "status"],
        )
        counts: dict[tuple[str, str], int] = {}
        oldest: datetime | None = None
        # (By the kind as an expression: or SQLite walks every email, in the kind index's order.)
        kind_of = not_searched(Email.kind)
        pending = session.execute(
            select(kind_of, func.count(), func.min(Email.created_at))
            .where(WAITING)
            .group_by(kind_of)
        ).all()
        for kind, count, created in pending:
            key = (metrics.email_kind(kind), "pending")
            counts[key] = counts.get(key, 0) + count
            oldest = created if oldest is None or (created and created < oldest) else oldest
        failed = session.execute(
            select(Email.kind, func.count())
            .where(Email.failed_at.is_not(None))
            .group_by(Email.kind)
        ).all()
        for kind, count in failed:
            key = (metrics.email_kind(kind), "failed")
            counts[key] = counts.get(key, 0) + count
        for (kind, status), count in sorted(counts.items()):
            rows.add_metric([kind, status], count)
        age = _gauge(
            "email_oldest_pending_age_seconds",
            "Age of the oldest message still waiting to be accepted by the SMTP server "
            "(0 when none waits).",
        )
        age.add_metric([], _age(now, oldest))
        return [rows, age]

    def _cancellations(self, session: Session, now: datetime) -> list[Metric]:
        rows = _gauge(
            "cancellation_rows",
            "Cancellations by state: scheduled (waiting for their next attempt), running "
            "(a worker holds one), failed (one alert each; waiting for an admin's retry).",
            ["status"],
        )
        counts = dict(
            session.execute(
                select(Cancellation.status, func.count())
                .where(Cancellation.status.in_(OPEN_CANCELLATION_STATES))
                .group_by(Cancellation.status)
            ).all()
        )
        for status in OPEN_CANCELLATION_STATES:
            rows.add_metric([status], counts.get(status, 0))
        return [rows]

    def _overdue(self, session: Session, now: datetime) -> Metric:
        """How late the most overdue row of each kind of work is: what the stuck-work sweep
        re-enqueues, seen before it does (a backlog the queue cannot date)."""
        overdue = _gauge(
            "overdue_work_seconds",
            "How long the most overdue piece of work has been due: a cancellation past its "
            "next attempt, an unsent email past its next try, a paid order of a listed "
            "one-time plan not delivered since its payment, a stored webhook not applied since "
            "it arrived (0: nothing overdue).",
            ["kind"],
        )
        cancellation = session.scalar(
            select(func.min(Cancellation.next_attempt_at)).where(
                Cancellation.status == CancellationStatus.SCHEDULED.value
            )
        )
        email = session.scalar(select(func.min(Email.next_attempt_at)).where(WAITING))
        listed = list(self._runtime.catalog.plans)
        delivery = (
            session.scalar(
                select(func.min(Order.paid_at)).where(
                    Order.status == OrderStatus.PAID.value,
                    Order.billing_reason == ONE_TIME,
                    Order.plan_id.in_(listed),
                )
            )
            if listed
            else None
        )
        event = session.scalar(
            select(func.min(WebhookEvent.received_at)).where(
                WebhookEvent.status == EventStatus.RECEIVED.value
            )
        )
        overdue.add_metric(["cancellation"], _age(now, cancellation))
        overdue.add_metric(["delivery"], _age(now, delivery))
        overdue.add_metric(["email"], _age(now, email))
        overdue.add_metric(["event"], _age(now, event))
        return overdue

    def _events(self, session: Session) -> Metric:
        counts = dict(
            session.execute(
                select(WebhookEvent.status, func.count())
                .where(WebhookEvent.status.in_(OPEN_EVENT_STATES))
                .group_by(WebhookEvent.status)
            ).all()
        )
        events = _gauge(
            "webhook_event_rows",
            "Stored webhooks not applied: received (waiting for the webhooks.apply job) and "
            "failed (re-applied with backoff; see events list).",
            ["status"],
        )
        for status in OPEN_EVENT_STATES:
            events.add_metric([status], counts.get(status, 0))
        return events

    def _alerts(self, session: Session) -> list[Metric]:
        rows = _gauge(
            "alert_rows",
            "Alerts by kind: open (not resolved: incidents such as whop_unreachable, whop_auth, "
            "low_stock, out_of_stock resolve by themselves; other kinds stay open) and "
            "awaiting_digest (folded, to go out in the next digest).",
            ["kind", "state"],
        )
        open_alerts = session.execute(
            select(Alert.kind, func.count()).where(Alert.resolved_at.is_(None)).group_by(Alert.kind)
        ).all()
        folded = session.execute(
            select(Alert.kind, func.count()).where(Alert.notified_at.is_(None)).group_by(Alert.kind)
        ).all()
        for kind, count in sorted(open_alerts):
            rows.add_metric([kind, "open"], count)
        for kind, count in sorted(folded):
            rows.add_metric([kind, "awaiting_digest"], count)
        return [rows]


def metrics_router(runtime: Runtime) -> APIRouter:
    """`GET /metrics` for Prometheus: only with `Authorization: Bearer <METRICS_TOKEN>` (401
    otherwise); no route at all (404) when METRICS_TOKEN is unset. It reports this process's
    counters (with PROMETHEUS_MULTIPROC_DIR: every process's on this machine) and the
    database's figures."""
    router = APIRouter()
    setting = runtime.settings.METRICS_TOKEN
    if setting is None:
        return router
    # Compared as digests: equal length whatever is offered, so the compare leaks nothing.
    token_digest = hashlib.sha256(setting.get_secret_value().encode()).digest()
    collector = DatabaseCollector(runtime)

    @router.get("/metrics", include_in_schema=False)
    async def scrape(request: Request) -> Response:
        if not metrics.bearer_matches(request.headers.get("authorization"), token_digest):
            return JSONResponse(
                {"error": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        body = await run_in_threadpool(metrics.exposition, collector)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    return router
