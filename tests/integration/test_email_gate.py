"""Delivery includes the email (issue 10, finding 6): a membership is cancelled only once the
SMTP server accepted the customer's delivery email. A permanent rejection, or no acceptance
within EMAIL_GIVE_UP_AFTER, ends that email `failed` with one `email_failed` alert, and the
membership stays live at Whop until the admin resends (or cancels by hand).

Real parts: each database, the Whop simulator over HTTP, an aiosmtpd sink on a port of its own
that the test starts, stops, or has answer 550 for one address; time moves by the test's clock."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from support.harness import (
    ADMIN,
    MESSAGE_PLAN,
    NONE_PLAN,
    drain,
    wait_for,
)
from support.shop import Shop, open_shop
from support.statements import recorded
from whop_autocancel.admin.operations import cancel_membership
from whop_autocancel.clock import FrozenClock
from whop_autocancel.logs import configure_logging
from whop_autocancel.mail.models import Email
from whop_autocancel.simulator import SimulatorServer


@pytest.fixture
def shop(
    tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer, database_url: str
) -> Iterator[Shop]:
    yield from open_shop(tmp_path, clock, simulator, DATABASE_URL=database_url)


@pytest.fixture
def impatient_shop(
    tmp_path: Path, clock: FrozenClock, simulator: SimulatorServer, database_url: str
) -> Iterator[Shop]:
    yield from open_shop(
        tmp_path, clock, simulator, DATABASE_URL=database_url, CANCEL_GIVE_UP_AFTER=60
    )


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger back afterwards, so later tests do not log to this test's
    finished capture."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_smtp_down_means_no_cancel_until_the_email_is_accepted(shop: Shop) -> None:
    purchase = shop.buy()  # SMTP is down: the email failed its first try
    [email] = shop.customer_emails(purchase)
    assert (email.sent_at, email.failed_at, email.attempts) == (None, None, 1)

    row = shop.run_cancellation(purchase, after=5)  # CANCEL_DELAY is over
    assert row.status == "scheduled"
    assert row.attempts == 0  # waiting for the email costs no attempt
    assert "delivery email" in (row.last_error or "")
    assert row.next_attempt_at > shop.clock.now()
    shop.time_passes(120)  # sweeps and retries for two minutes, SMTP still down
    assert shop.whop_cancels(purchase) == []
    assert shop.membership_status(purchase) != "canceled"
    assert shop.cancellation(purchase).status == "scheduled"

    # SMTP comes back: the email goes at its next try, and the cancellation follows at once
    # (woken by the sent email, not at its own next check).
    sink = shop.smtp_up()
    [email] = shop.customer_emails(purchase)
    shop.clock.set(max(email.next_attempt_at, shop.clock.now()))
    shop.runtime.jobs.huey.flush()  # no job left but the one the sent email defers
    shop.runtime.outbox.send(email.id)
    drain(shop.runtime)  # only what is due now: no scheduled job, no clock move
    assert len(sink.to(purchase["email"])) == 1
    row = shop.cancellation(purchase)
    assert row.status == "canceled"
    assert row.last_error is None
    assert len(shop.whop_cancels(purchase)) == 1
    assert shop.membership_status(purchase) == "canceled"
    assert shop.alerts("email_failed") == []


def test_a_550_for_the_buyer_fails_the_email_alerts_once_and_leaves_the_membership_live(
    shop: Shop, capfd: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("INFO", "json")  # to this test's captured stderr
    sink = shop.smtp_up()
    address = "typo@example.invalid"
    sink.reject(address)
    purchase = shop.buy(email=address)

    [email] = shop.customer_emails(purchase)
    assert email.sent_at is None
    assert email.failed_at is not None
    assert email.attempts == 1
    assert "550" in (email.last_error or "")
    assert "Recipient address rejected" in (email.last_error or "")

    row = shop.run_cancellation(purchase, after=5)
    assert row.status == "scheduled"
    assert "failed" in (row.last_error or "")
    assert f"whop-autocancel orders resend {purchase['order_id']}" in (row.last_error or "")
    # Parked at the last retry interval (4 s here, ±10 %), not spinning.
    assert 3.5 <= (row.next_attempt_at - shop.clock.now()).total_seconds() <= 4.5

    shop.time_passes(600)  # stuck sweeps and every due job: nothing is retried or cancelled
    assert shop.whop_cancels(purchase) == []
    assert shop.membership_status(purchase) != "canceled"
    [email] = shop.customer_emails(purchase)
    assert email.attempts == 1  # a failed email is never tried again
    assert shop.cancellation(purchase).status == "scheduled"

    [alert] = shop.alerts("email_failed")  # exactly one, after all those sweeps
    assert alert.order_id == purchase["order_id"]
    [mail] = [m for m in sink.to(ADMIN) if m.subject == alert.subject]
    for text in (mail.text, alert.text_body):
        assert purchase["order_id"] in text
        assert address in text
        assert "550" in text
        assert "NOT cancelled" in text
        assert f"whop-autocancel orders resend {purchase['order_id']}" in text
        assert f"whop-autocancel cancel {purchase['membership_id']}" in text

    # The admin fixes the address at the mail server (here: the sink accepts it) and resends.
    sink.accept(address)
    shop.runtime.delivery.resend(purchase["order_id"])
    drain(shop.runtime)
    assert len(sink.to(address)) == 1
    row = shop.cancellation(purchase)
    assert row.status == "canceled"
    assert len(shop.whop_cancels(purchase)) == 1
    assert shop.membership_status(purchase) == "canceled"
    assert len(shop.alerts("email_failed")) == 1

    # Every email log line names its order (None for mail that belongs to no order).
    err = capfd.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = [line for line in lines if str(line.get("event", "")).startswith("email_")]
    assert {line["event"] for line in events} >= {"email_sent", "email_failed"}
    assert all("order_id" in line for line in events)
    failed = [line for line in events if line["event"] == "email_failed"]
    assert [line["order_id"] for line in failed] == [purchase["order_id"]]
    assert failed[0]["level"] == "error"
    sent = [line for line in events if line["event"] == "email_sent" and line["kind"] == "delivery"]
    assert [line["order_id"] for line in sent] == [purchase["order_id"]]


def test_no_acceptance_within_the_give_up_time_fails_the_email_with_one_alert(
    shop: Shop,
) -> None:
    purchase = shop.buy()  # SMTP down
    shop.time_passes(3000, rounds=6)  # still within EMAIL_GIVE_UP_AFTER (3600 s)
    [email] = shop.customer_emails(purchase)
    assert email.failed_at is None
    assert email.attempts > 3  # retried on the schedule all along
    assert shop.alerts("email_failed") == []
    assert shop.cancellation(purchase).status == "scheduled"

    shop.time_passes(700, rounds=2)  # past the give-up time: the next failed try ends it
    [email] = shop.customer_emails(purchase)
    assert email.failed_at is not None
    assert email.sent_at is None
    assert "ConnectionRefusedError" in (email.last_error or "")
    attempts = email.attempts
    [alert] = shop.alerts("email_failed")
    assert purchase["email"] in alert.text_body
    assert "ConnectionRefusedError" in alert.text_body
    assert "NOT cancelled" in alert.text_body

    shop.time_passes(600)
    [email] = shop.customer_emails(purchase)
    assert email.attempts == attempts  # no more tries
    assert shop.whop_cancels(purchase) == []
    assert shop.membership_status(purchase) != "canceled"
    row = shop.cancellation(purchase)
    assert row.status == "scheduled"
    assert "resend" in (row.last_error or "")
    assert len(shop.alerts("email_failed")) == 1

    # The admin's own mail is never given up by time: it goes once SMTP is back.
    with shop.runtime.database.transaction() as session:
        admin = list(session.scalars(select(Email).where(Email.to_address == ADMIN)))
    assert admin
    assert all(e.failed_at is None for e in admin)

    # The customer got the product another way: the admin cancels by hand, and that is not
    # held for the failed email.
    result = cancel_membership(shop.runtime, purchase["membership_id"])
    assert result.status == "canceled"
    assert result.last_error is None  # no stale "waiting for the email" on a cancelled row
    assert shop.membership_status(purchase) == "canceled"


def test_a_none_delivery_is_cancelled_without_any_email(shop: Shop) -> None:
    purchase = shop.buy(plan=NONE_PLAN)  # SMTP down: only the admin notice is queued
    assert shop.customer_emails(purchase) == []
    row = shop.run_cancellation(purchase, after=5)
    assert row.status == "canceled"
    assert shop.membership_status(purchase) == "canceled"


def test_the_wait_for_the_email_does_not_count_against_whops_give_up_time(
    impatient_shop: Shop,
) -> None:
    """CANCEL_GIVE_UP_AFTER (60 s here) measures how long Whop could not be reached, from
    when the email was accepted: ten minutes of SMTP outage before it must not fail the first
    Whop error."""
    shop = impatient_shop
    purchase = shop.buy()  # SMTP down
    shop.time_passes(600)
    assert shop.cancellation(purchase).status == "scheduled"
    shop.smtp_up()
    shop.simulator.state.set_outage(True)
    shop.time_passes(40, rounds=1)  # the sweep sends the email; the cancel meets the outage
    [email] = shop.customer_emails(purchase)
    assert email.sent_at is not None
    row = shop.cancellation(purchase)
    assert (row.status, row.attempts) == ("scheduled", 1)
    assert "could not be reached" not in (row.last_error or "")
    shop.simulator.state.set_outage(False)
    assert shop.run_cancellation(purchase, after=2).status == "canceled"
    assert shop.membership_status(purchase) == "canceled"


def cancellation_jobs(shop: Shop) -> list[tuple[Any, ...]]:
    """The cancellation jobs in the queue, ready or scheduled: their arguments."""
    huey = shop.runtime.jobs.huey
    return [
        tuple(task.args)
        for task in [*huey.pending(), *huey.scheduled()]
        if task.name == "cancellation.run"
    ]


def cancellation_runs() -> float:
    return (
        REGISTRY.get_sample_value("whop_autocancel_job_runs_total", {"job": "cancellation.run"})
        or 0.0
    )


def test_a_cancellation_is_armed_by_its_accepted_email_and_runs_once(shop: Shop) -> None:
    """No run before the delivery email is in: the delivery arms no timer while its email is
    pending (a run then would only find the email missing and wait again, a wasted claim
    under load); the accepted email arms it, at CANCEL_DELAY after the delivery or at once
    when that time has passed."""
    purchase = shop.buy()  # SMTP is down: the email waits for its next try
    assert cancellation_jobs(shop) == []
    shop.clock.advance(30)  # long past CANCEL_DELAY
    shop.smtp_up()
    [email] = shop.customer_emails(purchase)
    shop.clock.set(max(email.next_attempt_at, shop.clock.now()))
    shop.runtime.jobs.huey.flush()
    shop.runtime.outbox.send(email.id)
    assert cancellation_jobs(shop) == [(purchase["cancellation_id"],)]
    runs = cancellation_runs()
    drain(shop.runtime)
    assert cancellation_runs() - runs == 1
    assert shop.cancellation(purchase).status == "canceled"

    # Accepted before CANCEL_DELAY is over: armed for the rest of it, not at once.
    second = shop.buy()  # SMTP up now: the email went during the delivery's drain
    [email] = shop.customer_emails(second)
    assert email.sent_at is not None
    [scheduled] = [
        task for task in shop.runtime.jobs.huey.scheduled() if task.name == "cancellation.run"
    ]
    assert tuple(scheduled.args) == (second["cancellation_id"],)
    assert shop.cancellation(second).status == "scheduled"
    assert shop.cancellation(second).last_error is None


def test_the_delivery_knows_its_email_is_on_its_way_without_reading_it_back(shop: Shop) -> None:
    """The delivery that queues the customer's email arms no cancellation (the email's
    acceptance does): it knows the email is on its way from the row it has just queued. It
    read the order's delivery emails back for that, one statement a purchase."""
    delivered: list[tuple[str, Any]] = []
    huey = shop.runtime.jobs.huey

    def execute(task: Any, timestamp: Any) -> None:
        if task.name != "delivery.deliver":
            huey.execute(task, timestamp=timestamp)
            return
        with recorded(shop.runtime.database.engine) as sent:
            huey.execute(task, timestamp=timestamp)
        delivered.extend(sent)

    shop.smtp_down()
    shop.simulator.state.create_purchase(MESSAGE_PLAN, email="gate@example.com")
    wait_for(lambda: shop.simulator.state.pending_webhooks() == 0)
    drain(shop.runtime, execute=execute)
    inserts = [s for s, _ in delivered if s.upper().startswith("INSERT INTO EMAILS")]
    assert len(inserts) == 2  # the customer's and the admin's
    assert not [s for s, _ in delivered if s.upper().startswith("SELECT") and "FROM emails" in s]
    assert cancellation_jobs(shop) == []
    with shop.runtime.database.transaction() as session:
        [email] = session.scalars(select(Email).where(Email.to_address == "gate@example.com"))
        assert (email.kind, email.sent_at) == ("delivery", None)
