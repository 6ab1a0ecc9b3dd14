"""The overview's queries on SQLite, PostgreSQL and MariaDB: hourly counts grouped by the
database, due work and its lag, sweeps, open alerts, the cancellations listing. (The emails
page's listing is `admin/emails.py`'s, tested with the `emails` command.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from whop_autocancel.admin import overview
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.db import leases
from whop_autocancel.db.engine import Database
from whop_autocancel.mail.models import Email
from whop_autocancel.orders.models import Order
from whop_autocancel.schema.migrate import upgrade
from whop_autocancel.webhooks.models import WebhookEvent

NOW = datetime(2026, 12, 5, 14, 37, 12, tzinfo=UTC)


def order(number: int, status: str, paid: datetime | None, delivered: datetime | None) -> Order:
    return Order(
        id=f"ord_{number}",
        status=status,
        created_at=paid or NOW,
        paid_at=paid,
        delivered_at=delivered,
        email=f"buyer{number}@example.com",
        whop_payment_id=f"pay_{number}" if paid else None,
        plan_id="plan_Unlisted" if number == 7 else "plan_Listed",
        billing_reason="one_time",
    )


def cancellation(
    order_id: str, status: str, at: datetime, canceled: datetime | None
) -> Cancellation:
    return Cancellation(
        order_id=order_id,
        status=status,
        membership_id=f"mem_{order_id}",
        generation_started_at=at,
        next_attempt_at=at,
        created_at=at,
        updated_at=canceled or at,
        canceled_at=canceled,
    )


def alert(key: str, kind: str, at: datetime, resolved: datetime | None = None) -> Alert:
    return Alert(
        kind=kind,
        dedupe_key=key,
        subject=f"subject {key}",
        text_body="body",
        created_at=at,
        resolved_at=resolved,
    )


def email(
    to: str, at: datetime, *, sent: datetime | None = None, failed: datetime | None = None
) -> Email:
    return Email(
        kind="delivery",
        to_address=to,
        subject=f"Your order for {to}",
        text_body="SECRET BODY",
        html_body="<p>SECRET BODY</p>",
        created_at=at,
        next_attempt_at=at,
        sent_at=sent,
        failed_at=failed,
        order_id="ord_1",
    )


def test_the_overview_on_every_database(database_url: str) -> None:
    database = Database(database_url)
    upgrade(database)
    hour = NOW.replace(minute=0, second=0, microsecond=0)
    try:
        with database.transaction() as session:
            session.add_all(
                [
                    order(1, "delivered", NOW - timedelta(minutes=30), NOW - timedelta(minutes=29)),
                    order(2, "delivered", NOW - timedelta(minutes=5), NOW - timedelta(minutes=4)),
                    order(3, "delivered", NOW - timedelta(hours=30), NOW - timedelta(hours=30)),
                    order(4, "paid", NOW - timedelta(minutes=2), None),  # due: not delivered
                    order(5, "paid", NOW - timedelta(days=8), None),  # too old for the chart
                    order(6, "pending", None, None),
                    order(7, "paid", NOW - timedelta(minutes=9), None),  # unlisted: recorded only
                ]
            )
            session.flush()
            session.add_all(
                [
                    cancellation("ord_1", "canceled", NOW - timedelta(minutes=29), NOW),
                    cancellation(
                        "ord_3", "canceled", NOW - timedelta(hours=30), NOW - timedelta(hours=30)
                    ),
                    cancellation("ord_2", "scheduled", NOW - timedelta(seconds=40), None),
                    cancellation("ord_4", "failed", NOW - timedelta(minutes=1), None),
                    alert("a1", "cancellation_failed", NOW - timedelta(minutes=1)),
                    alert("a2", "low_stock", NOW - timedelta(minutes=1)),  # not a failure
                    alert("a3", "whop_unreachable", NOW - timedelta(hours=2), NOW),  # resolved
                    email("a@x.test", NOW - timedelta(minutes=3), sent=NOW),
                    email("b@x.test", NOW - timedelta(minutes=2)),  # due for 2 minutes
                    email("c@x.test", NOW - timedelta(minutes=1), failed=NOW),
                    WebhookEvent(
                        id="msg_1",
                        type="payment.succeeded",
                        payload="{}",
                        received_at=NOW - timedelta(minutes=7),
                        status="failed",
                    ),
                    leases.Lease(key="sweep:stuck", holder="w1", until=NOW + timedelta(seconds=54)),
                    leases.Lease(key="heartbeat:w1", holder="w1", until=NOW - timedelta(seconds=5)),
                    leases.Lease(key="heartbeat:w0", holder="w0", until=NOW - timedelta(hours=1)),
                ]
            )

        with database.transaction() as session:
            activity = overview.hourly_activity(session, NOW)
            listed = ["plan_Listed"]
            backlog = {item.name: item for item in overview.backlogs(session, NOW, listed)}
            swept = overview.sweeps(session, NOW, heartbeat_max_age=120)
            alerts = overview.open_alerts(session)
            recent = overview.recent_cancellations(session, statuses=["canceled"])

        assert len(activity.hours) == 168
        assert activity.hours[-1] == hour
        assert activity.hours[0] == hour - timedelta(hours=167)
        assert activity.counts["purchases"][-1] == 4  # orders 1, 2, 4, 7
        assert activity.counts["deliveries"][-1] == 2
        assert activity.counts["cancellations"][-1] == 1
        assert activity.counts["failures"][-1] == 1  # low stock is not a failure
        assert activity.counts["failures"][-3] == 1  # the resolved one counts where it was
        thirty_hours_ago = activity.hours.index(
            (NOW - timedelta(hours=30)).replace(minute=0, second=0, microsecond=0)
        )
        assert activity.counts["purchases"][thirty_hours_ago] == 1
        assert activity.counts["cancellations"][thirty_hours_ago] == 1
        assert activity.total("purchases") == 5  # the 8-day-old one is outside

        assert backlog["cancellations due"].count == 1
        assert backlog["cancellations due"].lag(NOW) == 40
        assert backlog["emails due"].count == 1
        assert backlog["emails due"].lag(NOW) == 120
        assert backlog["paid, not delivered"].count == 2
        assert backlog["events failing to apply"].count == 1
        assert backlog["waiting for stock"].count == 0
        assert backlog["waiting for stock"].lag(NOW) == 0

        assert swept.stuck_lease_until == NOW + timedelta(seconds=54)
        assert overview.sweep_started(swept.stuck_lease_until, 60) == NOW
        assert swept.whop_lease_until is None
        assert swept.workers_alive == 1
        assert swept.latest_heartbeat == NOW - timedelta(seconds=5)

        assert alerts.total == 2
        assert [a.dedupe_key for a in alerts.newest] == ["a2", "a1"]  # same time: newest row first

        assert [c.order_id for c, _ in recent] == ["ord_1", "ord_3"]
    finally:
        database.dispose()
