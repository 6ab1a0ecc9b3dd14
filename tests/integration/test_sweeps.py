"""The stuck-work sweep: whatever a killed worker or a lost job left behind is enqueued again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text

from support.facts import email_row
from support.harness import (
    MESSAGE_PLAN,
    UNLISTED_PLAN,
    drain,
    event_body,
    make_runtime,
    make_settings,
)
from support.statements import recorded, sqlite_plan
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.mail.models import Email
from whop_autocancel.orders.models import Order
from whop_autocancel.reconcile.sweeps import QUEUE_BUSY, StuckWorkSweep
from whop_autocancel.runtime import Runtime
from whop_autocancel.webhooks.models import WebhookEvent
from whop_autocancel.whop.payloads import PaymentFacts


@pytest.fixture
def runtime(tmp_path: Path, clock: FrozenClock, database_url: str) -> Iterator[Runtime]:
    runtime = make_runtime(
        make_settings(
            tmp_path,
            DATABASE_URL=database_url,
            STUCK_GRACE=30,
            SWEEP_INTERVAL=60,
            EVENT_MAX_ATTEMPTS=3,
            RETRY_SCHEDULE="10,20",
        ),
        clock,
    )
    yield runtime
    runtime.close()


def queued(runtime: Runtime) -> list[tuple[str, tuple[object, ...]]]:
    return sorted((task.name, tuple(task.args)) for task in runtime.jobs.huey.pending())


def paid_order(runtime: Runtime, plan: str = MESSAGE_PLAN, number: int = 1) -> str:
    now = runtime.clock.now()
    facts = PaymentFacts(
        payment_id=f"pay_Sweep{number}",
        status="paid",
        billing_reason="one_time",
        membership_id=f"mem_Sweep{number}",
        plan_id=plan,
        product_id=None,
        user_id=None,
        email="buyer@example.com",
        checkout_configuration_id=None,
        metadata={},
        amount="10.00",
        currency="usd",
        created_at=now,
        paid_at=now,
    )
    with runtime.database.transaction() as session:
        order_id = runtime.orders.apply_payment(session, facts, now).id
    runtime.jobs.huey.flush()  # the "lost" delivery job
    return order_id


def order_status(runtime: Runtime, order_id: str) -> str:
    with runtime.database.transaction() as session:
        order = session.get(Order, order_id)
        assert order is not None
        return order.status


def test_a_paid_order_whose_delivery_job_was_lost_is_delivered_again(
    runtime: Runtime, clock: FrozenClock
) -> None:
    order_id = paid_order(runtime)
    paid_order(runtime, plan=UNLISTED_PLAN, number=2)  # never delivered: not listed
    assert runtime.stuck_sweep.run(force=True).deliveries == 0  # within the grace period
    clock.advance(31)
    report = runtime.stuck_sweep.run(force=True)
    assert report.deliveries == 1
    assert queued(runtime) == [("delivery.deliver", (order_id,))]
    drain(runtime)
    assert order_status(runtime, order_id) == "delivered"


def test_work_queued_behind_a_busy_queue_is_not_queued_again_until_the_queue_drains(
    runtime: Runtime, clock: FrozenClock
) -> None:
    """A flash sale leaves thousands of jobs ready on the queue: an order paid more than
    STUCK_GRACE ago is waiting its turn there, not lost. Queued again, it would be done twice
    over (once per sweep) by a worker already behind; so while QUEUE_BUSY jobs or more are
    ready, the sweep leaves deliveries and emails to them and looks again at its next tick."""
    order_id = paid_order(runtime)
    for number in range(QUEUE_BUSY):  # a backlog (deliveries of orders that do not exist)
        runtime.jobs.enqueue("delivery.deliver", f"ord_backlog{number}")
    clock.advance(31)
    report = runtime.stuck_sweep.run(force=True)
    assert (report.deliveries, report.queue_busy) == (0, True)
    assert ("delivery.deliver", (order_id,)) not in queued(runtime)
    drain(runtime)  # the worker catches up (its own job was lost: the order is still paid)
    report = runtime.stuck_sweep.run(force=True)
    assert (report.deliveries, report.queue_busy) == (1, False)
    assert queued(runtime) == [("delivery.deliver", (order_id,))]
    drain(runtime)
    assert order_status(runtime, order_id) == "delivered"


def test_overdue_and_abandoned_cancellations_are_woken(
    runtime: Runtime, clock: FrozenClock
) -> None:
    order_id = paid_order(runtime)
    runtime.delivery.deliver(order_id)
    runtime.jobs.huey.flush()
    with runtime.database.transaction() as session:
        row = session.scalars(select(Cancellation)).one()
        cancellation_id = row.id
    clock.advance(5 + 29)
    assert runtime.stuck_sweep.run(force=True).cancellations == 0
    clock.advance(2)
    assert runtime.stuck_sweep.run(force=True).cancellations == 1
    assert [job for job in queued(runtime) if job[0] == "cancellation.run"] == [
        ("cancellation.run", (cancellation_id,))
    ]
    runtime.jobs.huey.flush()
    # A worker died holding the lease: woken once the lease has expired.
    with runtime.database.transaction() as session:
        row = session.get(Cancellation, cancellation_id)
        assert row is not None
        row.status = "running"
        row.lease_until = clock.now() + timedelta(seconds=60)
        row.lease_owner = "dead-worker"
    assert runtime.stuck_sweep.run(force=True).cancellations == 0
    clock.advance(61)
    assert runtime.stuck_sweep.run(force=True).cancellations == 1


def test_unsent_emails_are_sent_again(runtime: Runtime, clock: FrozenClock) -> None:
    order_id = paid_order(runtime)
    runtime.delivery.deliver(order_id)
    runtime.jobs.huey.flush()
    clock.advance(31)
    report = runtime.stuck_sweep.run(force=True)
    assert report.emails == 2  # the customer's and the admin's


@contextmanager
def orders_refused(runtime: Runtime) -> Iterator[None]:
    """The database refuses every new order (a trigger) until the block ends: a fault that is
    neither the event's data nor the database being down, so applying is retried."""
    statements = {
        "sqlite": (
            [
                "CREATE TRIGGER refuse_orders BEFORE INSERT ON orders "
                "BEGIN SELECT RAISE(ABORT, 'orders refused by a test trigger'); END"
            ],
            ["DROP TRIGGER refuse_orders"],
        ),
        "postgresql": (
            [
                "CREATE FUNCTION refuse_orders() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'orders refused by a test trigger'; END $$ LANGUAGE plpgsql",
                "CREATE TRIGGER refuse_orders BEFORE INSERT ON orders "
                "FOR EACH ROW EXECUTE FUNCTION refuse_orders()",
            ],
            ["DROP TRIGGER refuse_orders ON orders", "DROP FUNCTION refuse_orders()"],
        ),
        # MariaDB reports a SIGNAL as an OperationalError (the database being unavailable):
        # the trigger breaks a NOT NULL column instead, an IntegrityError.
        "mysql": (
            [
                "CREATE TRIGGER refuse_orders BEFORE INSERT ON orders "
                "FOR EACH ROW SET NEW.status = NULL"
            ],
            ["DROP TRIGGER refuse_orders"],
        ),
    }
    create, drop = statements[runtime.database.backend]
    with runtime.database.engine.begin() as connection:
        for statement in create:
            connection.execute(text(statement))
    try:
        yield
    finally:
        with runtime.database.engine.begin() as connection:
            for statement in drop:
                connection.execute(text(statement))


def test_a_failed_event_is_reapplied_with_backoff_and_alerts_after_max_attempts(
    runtime: Runtime, clock: FrozenClock
) -> None:
    body = event_body(
        "payment.succeeded.legacy.json",
        id="pay_Refused1",
        plan={"id": MESSAGE_PLAN, "metadata": {}},
        metadata={},
        checkout_configuration_id=None,
    )
    from support.harness import signed_headers

    mariadb = runtime.database.backend == "mysql"
    with orders_refused(runtime):
        assert runtime.inbox.ingest(body, signed_headers(body)).http_status == 200
        drain(runtime)  # the apply job: the first attempt fails
        assert runtime.stuck_sweep.run(force=True).events == 0  # first retry in 10 s
        for attempt in (2, 3):
            clock.advance(25)
            assert runtime.stuck_sweep.run(force=True).events == 1
            drain(runtime)
            with runtime.database.transaction() as session:
                event = session.scalars(select(WebhookEvent)).one()
                assert (event.status, event.attempts) == ("failed", attempt)
                assert (event.last_error or "").startswith("IntegrityError" if mariadb else "")
                assert mariadb or "refused by a test trigger" in (event.last_error or "")
        with runtime.database.transaction() as session:
            alerts = list(session.scalars(select(Alert)))
        assert [a.kind for a in alerts] == ["event_apply_failed"]
    clock.advance(25)  # the fault is gone: the next retry applies it
    assert runtime.stuck_sweep.run(force=True).events == 1
    drain(runtime)
    with runtime.database.transaction() as session:
        assert session.scalars(select(WebhookEvent)).one().status == "handled"
        assert session.scalars(select(Order)).one().whop_payment_id == "pay_Refused1"


def test_an_event_whose_data_can_never_apply_is_not_retried(
    runtime: Runtime, clock: FrozenClock
) -> None:
    body = json.dumps(
        {"id": "msg_bad", "type": "payment.succeeded", "data": {"plan": {"id": MESSAGE_PLAN}}}
    ).encode()
    from support.harness import signed_headers

    assert runtime.inbox.ingest(body, signed_headers(body)).http_status == 200
    drain(runtime)  # the apply job: it fails for good
    clock.advance(3600)
    assert runtime.stuck_sweep.run(force=True).events == 0
    with runtime.database.transaction() as session:
        event = session.get(WebhookEvent, "msg_bad")
        assert event is not None
        assert (event.status, event.attempts, event.next_attempt_at) == ("failed", 1, None)
        alerts = list(session.scalars(select(Alert)))
    assert [a.kind for a in alerts] == ["event_apply_failed"]
    assert "It is not retried" in alerts[0].text_body


def test_only_one_worker_sweeps_per_tick(runtime: Runtime, clock: FrozenClock) -> None:
    other = StuckWorkSweep(
        runtime.database,
        runtime.catalog,
        runtime.jobs,
        runtime.alerts,
        clock,
        owner="another-worker",
        interval=60,
        grace=30,
        pending_ttl=86400,
    )
    assert runtime.stuck_sweep.run().ran
    assert not other.run().ran
    clock.advance(55)
    assert other.run().ran
    assert not runtime.stuck_sweep.run().ran


def test_the_sweeps_look_for_unsent_emails_reads_the_unsent_ones_only(runtime: Runtime) -> None:
    """Every tick looks for unsent emails: by the `next_attempt_at` index, which holds only
    the emails waiting (NULL for each one sent or given up), never by `sent_at`'s (where every
    email given up is NULL too) or `failed_at`'s (every email ever sent): SQLite, which keeps
    no statistics, would walk them all (the outbox's claim reads the same way)."""
    if runtime.database.backend != "sqlite":
        pytest.skip("reads SQLite's query plan")
    engine = runtime.database.engine
    with recorded(engine) as sent:
        runtime.stuck_sweep.run(force=True)
    [(sql, parameters)] = [
        (sql, parameters)
        for sql, parameters in sent
        if sql.lstrip().upper().startswith("SELECT") and "FROM emails" in sql
    ]
    plan = sqlite_plan(engine, sql, parameters)
    assert any("INDEX ix_emails_next_attempt_at (next_attempt_at<?)" in step for step in plan), plan


def test_the_sweep_clears_the_next_attempt_of_emails_the_previous_version_finished(
    runtime: Runtime, clock: FrozenClock
) -> None:
    """During a rolling upgrade past migration 0011, a process of the previous version marks
    emails sent or given up without clearing their next attempt. The outbox never sends them
    again (it checks `sent_at` and `failed_at`), but they would stay in the due index, read by
    every claim for ever: the sweep clears them once they are overdue, and touches no email
    still waiting. On PostgreSQL the due index holds only the emails not done, so they are
    never in it: nothing to clear, and nothing cleared (the update would read every email)."""
    now = clock.now()
    emails = Email.__table__
    rows = {"sent": {"sent_at": now}, "failed": {"failed_at": now}, "waiting": {}}
    with runtime.database.engine.begin() as connection:
        for kind, done in rows.items():  # each with its next attempt, as that version leaves it
            connection.execute(insert(emails).values(email_row(kind, now, **done)))
    clock.advance(60)  # past STUCK_GRACE
    runtime.stuck_sweep.run(force=True)
    with runtime.database.engine.connect() as connection:
        found = dict(connection.execute(select(emails.c.kind, emails.c.next_attempt_at)).all())
    if runtime.database.backend != "postgresql":
        assert found == {"sent": None, "failed": None, "waiting": now}
        return
    assert found == {"sent": now, "failed": now, "waiting": now}
    with runtime.database.engine.connect() as connection:
        kept_out = connection.exec_driver_sql(
            "SELECT pg_get_expr(indpred, indrelid) FROM pg_index "
            "WHERE indexrelid = 'ix_emails_next_attempt_at'::regclass"
        ).scalar_one()
    assert kept_out == "(COALESCE(failed_at, sent_at) IS NULL)"
