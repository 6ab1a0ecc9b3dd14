"""The Whop sweep against the simulator: purchases whose webhook never came are recovered, and
memberships still live at Whop are cancelled again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from support.harness import (
    MESSAGE_PLAN,
    UNLISTED_PLAN,
    ServiceServer,
    apply_webhooks,
    drain,
    make_runtime,
    make_settings,
    post_event,
    wait_for,
)
from support.statements import recorded
from whop_autocancel.admin.operations import ignore_event
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.cancellation.service import mark_inactive_from_webhook
from whop_autocancel.clock import FrozenClock
from whop_autocancel.db.install import start_watching
from whop_autocancel.mail.models import DELIVERY_KIND, Email
from whop_autocancel.mail.sink import SmtpSink
from whop_autocancel.orders.models import Order
from whop_autocancel.reconcile.whop_pages import PAGE_SIZE
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer
from whop_autocancel.webhooks.models import WebhookEvent


@pytest.fixture
def runtime(
    tmp_path: Path,
    clock: FrozenClock,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    database_url: str,
) -> Iterator[Runtime]:
    runtime = make_runtime(
        make_settings(
            tmp_path,
            DATABASE_URL=database_url,
            WHOP_API_URL=simulator.api_url,
            SMTP_URL=smtp_sink.url,  # a membership is cancelled once its email is accepted
            WHOP_COMPANY_ID="biz_SimStore",
        ),
        clock,
    )
    start_watching(runtime.database, clock.now() - timedelta(minutes=1))  # installed a minute ago
    yield runtime
    runtime.close()


def lost_purchase(simulator: SimulatorServer, plan: str = MESSAGE_PLAN) -> dict[str, Any]:
    """A purchase whose webhooks Whop never delivered."""
    return simulator.state.create_purchase(plan, email="lost@example.com", send_webhooks=False)


def orders(runtime: Runtime) -> dict[str, Order]:
    with runtime.database.transaction() as session:
        return {o.whop_payment_id or "": o for o in session.scalars(select(Order))}


def payment_lists(simulator: SimulatorServer) -> list[dict[str, Any]]:
    return [c for c in simulator.state.calls() if c["path"].endswith("/payments")]


def test_purchases_whose_webhook_never_came_are_recovered_once(
    runtime: Runtime, simulator: SimulatorServer, clock: FrozenClock
) -> None:
    listed = [lost_purchase(simulator), lost_purchase(simulator)]
    unlisted = lost_purchase(simulator, UNLISTED_PLAN)

    preview = runtime.whop_sweep.run(dry_run=True)
    assert sorted(preview.recovered_payments) == sorted(
        p["payment_id"] for p in [*listed, unlisted]
    )
    assert orders(runtime) == {}  # a dry run changes nothing

    report = runtime.whop_sweep.run(force=True)
    assert report.stopped is None
    assert len(report.recovered_payments) == 3
    found = orders(runtime)
    assert {p["payment_id"] for p in [*listed, unlisted]} == set(found)
    assert all(o.status == "paid" for o in found.values())
    queued = sorted(t.name for t in runtime.jobs.huey.pending())
    assert queued.count("delivery.deliver") == 2  # only the listed plan is delivered
    with runtime.database.transaction() as session:
        [alert] = list(session.scalars(select(Alert)))
    assert alert.kind == "missed_webhooks_recovered"
    assert listed[0]["payment_id"] in alert.text_body

    clock.advance(60)
    again = runtime.whop_sweep.run(force=True)
    assert again.recovered_payments == []
    first, second = payment_lists(simulator)[-2:]
    assert second["query"]["created_after"][0] > first["query"]["created_after"][0]

    drain(runtime)
    clock.advance(5)
    with runtime.database.transaction() as session:
        ids = list(session.scalars(select(Cancellation.id)))
    for cancellation_id in ids:
        runtime.cancellations.run(cancellation_id)
    for purchase in listed:
        assert simulator.state.membership(purchase["membership_id"])["status"] == "canceled"
    assert simulator.state.membership(unlisted["membership_id"])["status"] == "completed"


def test_a_membership_still_live_at_whop_is_cancelled_again(
    runtime: Runtime, simulator: SimulatorServer, clock: FrozenClock
) -> None:
    purchase = lost_purchase(simulator)
    runtime.whop_sweep.run(force=True)
    drain(runtime)
    # A wrong "deactivated" webhook made us believe the membership was gone.
    with runtime.database.transaction() as session:
        assert mark_inactive_from_webhook(session, purchase["membership_id"], clock.now()) == 1
    # A listing that began before the row ended may be older than it: left alone this time
    # (our own cancel can end while the sweep reads "active" pages).
    assert runtime.whop_sweep.run(force=True).recancelled == []
    clock.advance(1)
    assert runtime.whop_sweep.run(force=True, dry_run=True).recancelled == [
        purchase["membership_id"]
    ]
    report = runtime.whop_sweep.run(force=True)
    assert report.recancelled == [purchase["membership_id"]]
    with runtime.database.transaction() as session:
        row = session.scalars(select(Cancellation)).one()
    assert (row.status, row.generation) == ("scheduled", 2)
    runtime.cancellations.run(row.id)
    assert simulator.state.membership(purchase["membership_id"])["status"] == "canceled"
    # Cancelled now: the next sweep leaves it alone.
    assert runtime.whop_sweep.run(force=True).recancelled == []


def test_a_429_stops_the_sweep_and_is_shared_with_cancellations(
    runtime: Runtime, simulator: SimulatorServer
) -> None:
    lost_purchase(simulator)
    simulator.state.throttle(1, retry_after=30)
    report = runtime.whop_sweep.run(force=True)
    assert report.stopped is not None
    assert "rate-limited" in report.stopped
    calls_before = len(simulator.state.calls())
    waiting = runtime.whop_sweep.run(force=True)
    assert waiting.stopped is not None
    assert "wait until" in waiting.stopped
    assert len(simulator.state.calls()) == calls_before  # no call before Retry-After
    assert orders(runtime) == {}


def test_one_worker_sweeps_whop_per_interval(runtime: Runtime, clock: FrozenClock) -> None:
    other = make_runtime(runtime.settings, clock)  # another worker process
    try:
        assert runtime.whop_sweep.run().ran
        assert not other.whop_sweep.run().ran
        clock.advance(300)
        assert other.whop_sweep.run().ran
        assert not runtime.whop_sweep.run().ran
    finally:
        other.close()


def test_the_sweep_command_reports_and_a_dry_run_changes_nothing(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    from support.harness import run_cli, service_environment

    env = service_environment(tmp_path, WHOP_API_URL=simulator.api_url)
    runtime = make_runtime(make_settings(tmp_path))  # installed a minute ago
    start_watching(runtime.database, runtime.clock.now() - timedelta(minutes=1))
    runtime.close()
    assert run_cli(tmp_path, "migrate", env=env).returncode == 0
    purchase = lost_purchase(simulator)
    refunded = lost_purchase(simulator)
    simulator.state.refund_payment(refunded["payment_id"], "1")
    dry = run_cli(tmp_path, "sweep", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "would recover 1 whose webhook never came" in dry.stdout
    assert purchase["payment_id"] in dry.stdout
    assert "would skip 1 payment(s)" in dry.stdout
    [line] = [line for line in dry.stdout.splitlines() if refunded["payment_id"] in line]
    assert "refunded 1.00" in line
    real = run_cli(tmp_path, "sweep", env=env)
    assert real.returncode == 0, real.stderr
    assert "recovered 1 whose webhook never came" in real.stdout
    assert "skipped 1 payment(s)" in real.stdout
    assert "stuck work: re-enqueued 0 cancellation(s)" in real.stdout
    again = run_cli(tmp_path, "sweep", env=env)
    assert "recovered 0 whose webhook never came" in again.stdout
    unconfigured = run_cli(tmp_path, "sweep", env={**env, "WHOP_COMPANY_ID": ""})
    assert unconfigured.returncode == 1
    assert "WHOP_COMPANY_ID is not set" in unconfigured.stderr


@pytest.mark.parametrize(("status", "delivered"), [("pending", True), ("succeeded", False)])
def test_a_claim_that_came_before_a_lost_payment_does_not_hide_it(
    runtime: Runtime, simulator: SimulatorServer, status: str, delivered: bool
) -> None:
    """A refund webhook came, the payment's webhook never did: a refund that did not take the
    money back waits for its payment (no order is made for it) and the sweep delivers the
    payment; one that succeeded ends the purchase, and the sweep delivers nothing."""
    from whop_autocancel.orders.service import ClaimAhead
    from whop_autocancel.whop.payloads import ClaimFacts

    purchase = lost_purchase(simulator)
    claim = ClaimFacts("refund", "rf_Before1", purchase["payment_id"], status, "25.00", None)
    if delivered:
        with pytest.raises(ClaimAhead), runtime.database.transaction() as session:
            runtime.orders.apply_claim(session, claim, runtime.clock.now())
        assert orders(runtime) == {}
    else:
        with runtime.database.transaction() as session:
            runtime.orders.apply_claim(session, claim, runtime.clock.now())
    report = runtime.whop_sweep.run(force=True)
    assert (purchase["payment_id"] in report.recovered_payments) is delivered
    drain(runtime)
    order = orders(runtime)[purchase["payment_id"]]
    assert order.status == ("delivered" if delivered else "refunded")


# A backlog: webhooks stored at once, applied by the worker minutes later ---------------------


@pytest.fixture
def web(runtime: Runtime, simulator: SimulatorServer) -> Iterator[httpx.Client]:
    """The runtime's web app over real HTTP, the simulator sending its webhooks there, and no
    worker: what a webhook stores waits, `received`, until the test applies it."""
    with ServiceServer(runtime).running() as server:
        simulator.state.set_webhook_url(f"{server.url}/webhooks/whop")
        with httpx.Client(base_url=server.url, timeout=10) as client:
            yield client
        simulator.state.set_webhook_url(None)


def stored_purchase(simulator: SimulatorServer, email: str) -> dict[str, Any]:
    """A purchase whose webhooks came and were stored, and wait to be applied."""
    purchase = simulator.state.create_purchase(MESSAGE_PLAN, email=email)
    wait_for(lambda: simulator.state.pending_webhooks() == 0, what="the purchase's webhooks")
    assert {d["status"] for d in simulator.state.deliveries()} == {200}
    return purchase


def stored_events(runtime: Runtime) -> list[WebhookEvent]:
    with runtime.database.transaction() as session:
        return list(session.scalars(select(WebhookEvent).order_by(WebhookEvent.received_at)))


def missed_alerts(runtime: Runtime) -> list[Alert]:
    with runtime.database.transaction() as session:
        return list(session.scalars(select(Alert).where(Alert.kind == "missed_webhooks_recovered")))


def delivery_emails(runtime: Runtime, order_id: str) -> list[Email]:
    with runtime.database.transaction() as session:
        return list(
            session.scalars(
                select(Email).where(Email.order_id == order_id, Email.kind == DELIVERY_KIND)
            )
        )


def test_a_payment_whose_webhook_is_stored_but_not_applied_is_not_missed(
    runtime: Runtime,
    web: httpx.Client,
    simulator: SimulatorServer,
    smtp_sink: SmtpSink,
    clock: FrozenClock,
) -> None:
    """The flash-sale backlog: the sweep leaves a stored webhook's payment to the apply job
    (no order, no alert for it) and still recovers, and alerts, the one whose webhook never
    came, in the same sweep. Applying the stored webhook then delivers it exactly once."""
    waiting = stored_purchase(simulator, "waiting@example.com")
    lost = lost_purchase(simulator)
    by_type = {event.type: event for event in stored_events(runtime)}
    assert set(by_type) == {"payment.succeeded", "membership.activated"}  # the lost one: none
    assert by_type["payment.succeeded"].object_id == waiting["payment_id"]
    assert by_type["membership.activated"].object_id == waiting["membership_id"]
    assert {event.status for event in by_type.values()} == {"received"}
    assert orders(runtime) == {}  # the worker is behind

    assert runtime.whop_sweep.run(force=True, dry_run=True).recovered_payments == [
        lost["payment_id"]
    ]
    report = runtime.whop_sweep.run(force=True)
    assert report.stopped is None
    assert report.payments_seen == 2
    assert report.recovered_payments == [lost["payment_id"]]
    assert set(orders(runtime)) == {lost["payment_id"]}
    [alert] = missed_alerts(runtime)
    assert lost["payment_id"] in alert.text_body
    assert waiting["payment_id"] not in alert.text_body
    assert alert.subject.startswith("1 purchase(s)")

    # The worker catches up: the stored webhook is applied and delivers its purchase, once.
    assert apply_webhooks(runtime) >= 1
    drain(runtime)
    found = orders(runtime)
    assert set(found) == {waiting["payment_id"], lost["payment_id"]}
    order = found[waiting["payment_id"]]
    assert order.status == "delivered"
    assert order.whop_membership_id == waiting["membership_id"]
    assert {event.status for event in stored_events(runtime)} == {"handled"}
    assert len(delivery_emails(runtime, order.id)) == 1
    assert len(smtp_sink.to("waiting@example.com")) == 1

    clock.advance(60)  # and the next sweep finds nothing to recover
    assert runtime.whop_sweep.run(force=True).recovered_payments == []
    assert len(missed_alerts(runtime)) == 1


@pytest.mark.parametrize("outcome", ["received", "ignored", "failed"])
def test_a_stored_payment_webhook_whatever_became_of_it_is_not_missed(
    runtime: Runtime, web: httpx.Client, simulator: SimulatorServer, outcome: str
) -> None:
    """Whatever became of a stored `payment.succeeded` (waiting, set aside by an admin, failed
    with its own alert and retry path), its payment is not "missed": the sweep neither
    applies it nor raises `missed_webhooks_recovered`."""
    if outcome == "failed":
        # Its webhook came with data that cannot be stored (a plan id longer than its column).
        purchase = lost_purchase(simulator)
        body = json.dumps(
            {
                "id": "msg_CannotApply1",
                "type": "payment.succeeded",
                "data": {"id": purchase["payment_id"], "plan": {"id": "plan_" + "x" * 80}},
            }
        ).encode()
        assert post_event(web, body).status_code == 200
        apply_webhooks(runtime)
    else:
        purchase = stored_purchase(simulator, "stored@example.com")
        if outcome == "ignored":
            [paid] = [e for e in stored_events(runtime) if e.type == "payment.succeeded"]
            ignore_event(runtime, paid.id, actor="test")
    statuses = {e.status for e in stored_events(runtime) if e.type == "payment.succeeded"}
    assert statuses == {outcome}

    report = runtime.whop_sweep.run(force=True)
    assert (report.payments_seen, report.recovered_payments) == (1, [])
    assert purchase["payment_id"] not in orders(runtime)
    assert missed_alerts(runtime) == []


def test_a_claim_or_membership_webhook_does_not_hide_a_lost_payment(
    runtime: Runtime, web: httpx.Client, simulator: SimulatorServer
) -> None:
    """Only a stored `payment.succeeded` makes a payment known: its membership's activation
    (or any event whose data id is not the payment's) does not."""
    purchase = simulator.state.create_purchase(
        MESSAGE_PLAN, email="half@example.com", send_webhooks=False
    )
    activation = json.dumps(
        {
            "id": "msg_OnlyActivation1",
            "type": "membership.activated",
            "data": {"id": purchase["membership_id"], "plan": {"id": MESSAGE_PLAN}},
        }
    ).encode()
    pending = json.dumps(
        {
            "id": "msg_OnlyPending1",
            "type": "payment.pending",
            "data": {"id": purchase["payment_id"]},
        }
    ).encode()
    for body in (activation, pending):
        assert post_event(web, body).status_code == 200
    report = runtime.whop_sweep.run(force=True)
    assert report.recovered_payments == [purchase["payment_id"]]
    [alert] = missed_alerts(runtime)
    assert purchase["payment_id"] in alert.text_body


def test_the_sweep_asks_what_it_knows_of_a_page_of_payments_at_once(
    runtime: Runtime, web: httpx.Client, simulator: SimulatorServer
) -> None:
    """After a flash sale every sweep lists thousands of payments (WHOP_SWEEP_OVERLAP back from
    the last one): whether each is known is one read for a page of Whop's list, not one
    transaction for each payment, and the page's lost payment is still found."""
    whop = simulator.state
    for n in range(PAGE_SIZE + 20):
        whop.create_purchase(MESSAGE_PLAN, email=f"buyer{n}@example.com")
    wait_for(lambda: whop.pending_webhooks() == 0, what="the purchases' webhooks")
    lost = lost_purchase(simulator)
    with recorded(runtime.database.engine) as sent:
        report = runtime.whop_sweep.run(force=True)
    assert report.stopped is None
    assert report.payments_seen == PAGE_SIZE + 21
    assert report.recovered_payments == [lost["payment_id"]]
    looks = [statement for statement, _ in sent if "webhook_events.object_id" in statement]
    assert len(looks) == 2  # two pages
