"""Admin recovery commands (`orders`, `events list|replay|ignore`, `cancel MEMBERSHIP`): the
logic on SQLite, PostgreSQL and MariaDB with data made by the real ingest and delivery paths,
`cancel` against the Whop simulator over HTTP, and the commands through typer's CliRunner."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from sqlalchemy import func, select
from typer.testing import CliRunner

from support.harness import (
    KEEP_PLAN,
    MESSAGE_PLAN,
    UNLISTED_PLAN,
    apply_webhooks,
    drain,
    event_body,
    make_runtime,
    make_settings,
    run_cli,
    service_environment,
    signed_headers,
)
from whop_autocancel.admin.operations import (
    CancelRefused,
    OpsError,
    UnknownEvent,
    cancel_membership,
    cancel_target,
    ignore_event,
    list_events,
    list_orders,
    replay_event,
)
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.cli import app as cli_app
from whop_autocancel.clock import FrozenClock
from whop_autocancel.errors import WhopAutocancelError
from whop_autocancel.orders.models import Order
from whop_autocancel.runtime import Runtime
from whop_autocancel.simulator import SimulatorServer
from whop_autocancel.webhooks.models import WebhookEvent

# Helpers ------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def ingest(runtime: Runtime, body: bytes) -> str:
    """Deliver a signed webhook to the inbox, as the endpoint does, and apply it as a worker
    does (the queued `webhooks.apply` job); returns its event id."""
    result = runtime.inbox.ingest(body, signed_headers(body))
    assert result.http_status == 200, result.body
    apply_webhooks(runtime)
    event_id: str = json.loads(body)["id"]
    return event_id


def payment_body(
    *,
    plan: str = MESSAGE_PLAN,
    email: str = "buyer@example.com",
    payment_id: str | None = None,
    membership_id: str | None = None,
    billing_reason: str = "one_time",
) -> bytes:
    return event_body(
        "payment.succeeded.legacy.json",
        id=payment_id or new_id("pay"),
        billing_reason=billing_reason,
        membership={"id": membership_id or new_id("mem"), "status": "completed"},
        plan={"id": plan, "metadata": {}},
        user={"id": "user_Ops1", "email": email},
        metadata={},
        checkout_configuration_id=None,
    )


def envelope(event_type: str, data: dict[str, Any]) -> bytes:
    return json.dumps(
        {"id": new_id("msg"), "type": event_type, "timestamp": "2026-11-20T14:03:11Z", "data": data}
    ).encode()


def broken_payment(runtime: Runtime) -> str:
    """A signed payment.succeeded whose data has no id: stored `failed` by the inbox."""
    event_id = ingest(runtime, envelope("payment.succeeded", {"status": "paid"}))
    assert stored_event(runtime, event_id).status == "failed"
    return event_id


def stored_event(runtime: Runtime, event_id: str) -> WebhookEvent:
    with runtime.database.transaction() as session:
        row = session.get(WebhookEvent, event_id)
        assert row is not None
        return row


def order_of(runtime: Runtime, payment_id: str) -> Order:
    with runtime.database.transaction() as session:
        return session.scalars(select(Order).where(Order.whop_payment_id == payment_id)).one()


def count_orders(runtime: Runtime, payment_id: str) -> int:
    with runtime.database.transaction() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Order).where(Order.whop_payment_id == payment_id)
            )
            or 0
        )


def cancellation_rows(runtime: Runtime) -> list[Cancellation]:
    with runtime.database.transaction() as session:
        return list(session.scalars(select(Cancellation)))


@dataclass
class Purchase:
    payment_id: str
    membership_id: str
    order_id: str
    email: str


def purchase(
    runtime: Runtime,
    simulator: SimulatorServer,
    *,
    plan: str = MESSAGE_PLAN,
    billing_reason: str = "one_time",
    deliver: bool = True,
) -> Purchase:
    """A purchase Whop knows (the simulator), whose payment webhook reached the inbox, and
    (unless `deliver=False`) whose delivery job ran, which schedules the cancellation."""
    email = f"{new_id('buyer').lower()}@example.com"
    made = simulator.state.create_purchase(
        plan, email=email, billing_reason=billing_reason, send_webhooks=False
    )
    ingest(
        runtime,
        payment_body(
            plan=plan,
            email=email,
            payment_id=made["payment_id"],
            membership_id=made["membership_id"],
            billing_reason=billing_reason,
        ),
    )
    order = order_of(runtime, made["payment_id"])
    if deliver:
        runtime.delivery.deliver(order.id)
    return Purchase(made["payment_id"], made["membership_id"], order.id, email)


def whop_calls(simulator: SimulatorServer, membership_id: str | None = None) -> list[str]:
    return [f"{call['method']} {call['status']}" for call in simulator.state.calls(membership_id)]


# Fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def runtime(
    tmp_path: Path, database_url: str, clock: FrozenClock, simulator: SimulatorServer
) -> Iterator[Runtime]:
    built = make_runtime(
        make_settings(tmp_path, DATABASE_URL=database_url, WHOP_API_URL=simulator.api_url), clock
    )
    yield built
    built.close()


# Listing ------------------------------------------------------------------------------------


def test_orders_are_listed_newest_first_and_filtered(runtime: Runtime, clock: FrozenClock) -> None:
    first, second, third = new_id("pay"), new_id("pay"), new_id("pay")
    ingest(runtime, payment_body(payment_id=first, email="Ann@Example.com"))
    clock.advance(1)
    ingest(runtime, payment_body(payment_id=second, plan=UNLISTED_PLAN, email="bob@example.com"))
    clock.advance(1)
    ingest(runtime, payment_body(payment_id=third, email="ann@example.com"))
    runtime.delivery.deliver(order_of(runtime, first).id)

    with runtime.database.transaction() as session:
        everything = list_orders(session)
        delivered = list_orders(session, status="delivered")
        paid = list_orders(session, status="paid")
        ann = list_orders(session, email="  ANN@example.COM ")
        newest = list_orders(session, limit=1)
        with pytest.raises(OpsError, match=r"unknown status 'sent'; valid statuses: pending, paid"):
            list_orders(session, status="sent")

    def payments(rows: list[Any]) -> list[str | None]:
        return [row.order.whop_payment_id for row in rows]

    assert payments(everything) == [third, second, first]
    assert [row.cancellation.status if row.cancellation else None for row in everything] == [
        None,
        None,
        "scheduled",
    ]
    assert payments(delivered) == [first]
    assert payments(paid) == [third, second]
    assert payments(ann) == [third, first]
    assert payments(newest) == [third]


def test_events_are_listed_newest_first_and_filtered(runtime: Runtime, clock: FrozenClock) -> None:
    deactivated = ingest(runtime, event_body("membership.deactivated.legacy.json"))
    clock.advance(1)
    paid = ingest(runtime, payment_body())
    clock.advance(1)
    unknown = ingest(runtime, envelope("invoice.paid", {"id": "inv_1"}))
    clock.advance(1)
    failed = broken_payment(runtime)

    with runtime.database.transaction() as session:
        everything = [e.id for e in list_events(session)]
        failures = [e.id for e in list_events(session, status="failed")]
        ignored = [e.id for e in list_events(session, status="ignored")]
        payments = [e.id for e in list_events(session, event_type="payment.succeeded")]
        handled_payments = [
            e.id for e in list_events(session, status="handled", event_type="payment.succeeded")
        ]
        two = [e.id for e in list_events(session, limit=2)]
        with pytest.raises(OpsError, match="valid statuses: received, handled, ignored, failed"):
            list_events(session, status="lost")

    assert everything == [failed, unknown, paid, deactivated]
    assert failures == [failed]
    assert ignored == [unknown]
    assert payments == [failed, paid]
    assert handled_payments == [paid]
    assert two == [failed, unknown]


# Events -------------------------------------------------------------------------------------


def test_replaying_a_failed_event_applies_it_once(runtime: Runtime, clock: FrozenClock) -> None:
    """An apply that failed (the state the inbox leaves: the event alone, `failed`, its
    effects rolled back) is applied by a replay; a second replay changes nothing."""
    payment_id = new_id("pay")
    body = payment_body(payment_id=payment_id)
    event_id = json.loads(body)["id"]
    with runtime.database.transaction() as session:
        session.add(
            WebhookEvent(
                id=event_id,
                type="payment.succeeded",
                payload=body.decode(),
                received_at=clock.now(),
                status="failed",
                attempts=1,
                last_error="OperationalError: server closed the connection unexpectedly",
                next_attempt_at=clock.now(),
                object_id=payment_id,
            )
        )
    assert count_orders(runtime, payment_id) == 0

    result = replay_event(runtime, event_id)
    assert (result.previous_status, result.status, result.attempts) == ("failed", "handled", 2)
    assert "orders" in result.changed_tables
    assert result.last_error is None
    assert count_orders(runtime, payment_id) == 1
    assert runtime.jobs.pending() == 1  # the delivery job, enqueued after commit

    again = replay_event(runtime, event_id)
    assert (again.previous_status, again.status, again.changed_tables) == ("handled", "handled", ())
    assert count_orders(runtime, payment_id) == 1
    assert runtime.jobs.pending() == 1  # no second delivery job
    drain(runtime)
    assert order_of(runtime, payment_id).status == "delivered"


def test_replaying_an_interrupted_event_whose_effects_exist_changes_nothing(
    runtime: Runtime,
) -> None:
    deactivated = ingest(runtime, event_body("membership.deactivated.legacy.json"))
    payment_id = new_id("pay")
    paid = ingest(runtime, payment_body(payment_id=payment_id))
    with runtime.database.transaction() as session:  # as if a crash had interrupted it
        row = session.get(WebhookEvent, paid)
        assert row is not None
        row.status, row.handled_at, row.last_error = "failed", None, "worker killed"

    result = replay_event(runtime, paid)
    assert (result.previous_status, result.status, result.changed_tables) == (
        "failed",
        "handled",
        (),
    )
    assert count_orders(runtime, payment_id) == 1
    assert stored_event(runtime, paid).handled_at is not None

    handled = replay_event(runtime, deactivated)
    assert (handled.previous_status, handled.status, handled.changed) == (
        "handled",
        "handled",
        False,
    )


def test_replaying_an_event_that_still_fails_keeps_it_failed(runtime: Runtime) -> None:
    event_id = broken_payment(runtime)
    result = replay_event(runtime, event_id)
    assert (result.status, result.attempts, result.changed_tables) == ("failed", 2, ())
    assert result.last_error == "EventDataError: payment has no id"
    with pytest.raises(UnknownEvent, match="no event msg_Missing1"):
        replay_event(runtime, "msg_Missing1")


def test_ignore_stops_the_sweep_and_refuses_handled_events(
    runtime: Runtime, clock: FrozenClock
) -> None:
    failed, other = broken_payment(runtime), broken_payment(runtime)
    clock.advance(5)
    # A payment without an id can never apply: stored failed, never retried by the sweep.
    assert runtime.stuck_sweep.run(force=True).events == 0
    ignored = ignore_event(runtime, failed)
    assert (ignored.previous_status, ignored.changed) == ("failed", True)
    row = stored_event(runtime, failed)
    assert row.status == "ignored"
    assert row.next_attempt_at is None
    assert (row.last_error or "").startswith("ignored by an admin at ")
    assert "(it was failed: EventDataError: payment has no id)" in (row.last_error or "")
    assert stored_event(runtime, other).status == "failed"  # set aside only when asked
    assert ignore_event(runtime, other).changed
    assert runtime.stuck_sweep.run(force=True).events == 0

    assert not ignore_event(runtime, failed).changed  # already ignored: nothing to do
    handled = ingest(runtime, payment_body())
    with pytest.raises(OpsError, match=r"was handled at .*nothing to stop retrying"):
        ignore_event(runtime, handled)
    assert stored_event(runtime, handled).status == "handled"
    with pytest.raises(UnknownEvent):
        ignore_event(runtime, "msg_Missing1")

    replayed = replay_event(runtime, failed)  # an admin can change their mind
    assert (replayed.previous_status, replayed.status) == ("ignored", "failed")


# Manual cancellation ------------------------------------------------------------------------


def test_cancel_runs_now_and_a_second_cancel_calls_nobody(
    runtime: Runtime, simulator: SimulatorServer
) -> None:
    bought = purchase(runtime, simulator)
    [scheduled] = cancellation_rows(runtime)
    assert scheduled.next_attempt_at > runtime.clock.now()  # CANCEL_DELAY not over yet

    target = cancel_target(runtime, bought.membership_id)
    assert (target.order_id, target.cancellation_status, target.already_done) == (
        bought.order_id,
        "scheduled",
        False,
    )
    result = cancel_membership(runtime, bought.membership_id)
    assert (result.action, result.status, result.generation, result.ok) == (
        "brought_forward",
        "canceled",
        1,
        True,
    )
    assert result.cancellation_id == scheduled.id
    assert simulator.state.membership(bought.membership_id)["status"] == "canceled"
    assert whop_calls(simulator) == ["POST 200"]

    again = cancel_membership(runtime, f" {bought.membership_id} ")
    assert (again.action, again.status) == ("none", "canceled")
    assert cancel_target(runtime, bought.membership_id).already_done
    assert whop_calls(simulator) == ["POST 200"]


def test_cancel_of_an_order_without_a_cancellation_creates_one(
    runtime: Runtime, simulator: SimulatorServer
) -> None:
    bought = purchase(runtime, simulator, deliver=False)  # paid, delivery not run yet
    assert cancellation_rows(runtime) == []
    result = cancel_membership(runtime, bought.membership_id)
    assert (result.action, result.status, result.order_id) == (
        "created",
        "canceled",
        bought.order_id,
    )
    [row] = cancellation_rows(runtime)
    assert (row.order_id, row.membership_id, row.status) == (
        bought.order_id,
        bought.membership_id,
        "canceled",
    )
    [call] = simulator.state.calls(bought.membership_id)
    assert call["idempotency_key"] == f"cancel-{row.idempotency_token}-1"


@pytest.mark.parametrize(
    ("plan", "billing_reason", "reason"),
    [
        (UNLISTED_PLAN, "one_time", "is not listed in the catalog"),
        (MESSAGE_PLAN, "subscription_cycle", "'subscription_cycle', not 'one_time'"),
        (KEEP_PLAN, "one_time", r"delivery-only \(cancel = false"),
    ],
)
def test_cancel_refuses_what_the_safety_rule_forbids_without_calling_whop(
    runtime: Runtime, simulator: SimulatorServer, plan: str, billing_reason: str, reason: str
) -> None:
    bought = purchase(runtime, simulator, plan=plan, billing_reason=billing_reason)
    with pytest.raises(CancelRefused, match=reason):
        cancel_target(runtime, bought.membership_id)
    with pytest.raises(CancelRefused, match=rf"{bought.order_id}\) not cancelled: .*{reason}"):
        cancel_membership(runtime, bought.membership_id)
    assert simulator.state.calls() == []
    assert all(row.order_id != bought.order_id for row in cancellation_rows(runtime))


def test_a_failed_cancellation_is_retried_as_a_new_generation(
    runtime: Runtime, simulator: SimulatorServer
) -> None:
    bought = purchase(runtime, simulator)
    simulator.state.reject(bought.membership_id, 422)
    failed = cancel_membership(runtime, bought.membership_id)
    assert (failed.status, failed.ok, failed.last_http_status) == ("failed", False, 422)
    assert "still 'completed'" in (failed.last_error or "")

    simulator.state.unreject(bought.membership_id)
    retried = cancel_membership(runtime, bought.membership_id)
    assert (retried.action, retried.status, retried.generation) == ("retried", "canceled", 2)
    keys = [
        call["idempotency_key"]
        for call in simulator.state.calls(bought.membership_id)
        if call["method"] == "POST"
    ]
    [row] = cancellation_rows(runtime)
    assert len(keys) == 2
    assert keys[0].endswith("-1")
    assert keys[1] == f"cancel-{row.idempotency_token}-2"


def test_cancel_during_a_whop_outage_stays_scheduled_for_the_workers(
    runtime: Runtime, simulator: SimulatorServer
) -> None:
    bought = purchase(runtime, simulator)
    simulator.state.set_outage(True)
    queued = runtime.jobs.pending()
    result = cancel_membership(runtime, bought.membership_id)
    assert (result.status, result.ok, result.attempts) == ("scheduled", True, 1)
    assert "503" in (result.last_error or "")
    assert result.next_attempt_at > runtime.clock.now()
    assert runtime.jobs.pending() == queued + 1  # the next attempt, for a worker
    assert whop_calls(simulator, bought.membership_id) == ["POST 503"]


def test_cancel_acts_only_on_the_membership_typed(
    runtime: Runtime, simulator: SimulatorServer
) -> None:
    """The order names one membership and its cancellation row another (found by listing, or
    written before a binding was corrected): `cancel` of either refuses, calls nobody and
    changes nothing; it never cancels a membership other than the one typed."""
    bought = purchase(runtime, simulator)
    other = simulator.state.create_purchase(MESSAGE_PLAN, send_webhooks=False)["membership_id"]
    with runtime.database.transaction() as session:
        row = session.scalars(select(Cancellation)).one()
        row.membership_id = other
    [before] = cancellation_rows(runtime)
    for typed, names in ((bought.membership_id, other), (other, bought.membership_id)):
        message = (
            rf"membership {typed} \(order {bought.order_id}\) not cancelled: .*names "
            rf"membership {names}.*Whop was not called"
        )
        with pytest.raises(CancelRefused, match=message):
            cancel_target(runtime, typed)
        with pytest.raises(CancelRefused, match=message):
            cancel_membership(runtime, typed)
    assert simulator.state.calls() == []
    [after] = cancellation_rows(runtime)
    assert (after.status, after.membership_id, after.generation, after.next_attempt_at) == (
        before.status,
        before.membership_id,
        before.generation,
        before.next_attempt_at,
    )
    assert simulator.state.membership(other)["status"] == "completed"


def test_cancel_of_a_membership_found_by_listing_is_allowed(
    runtime: Runtime, simulator: SimulatorServer
) -> None:
    """Whop never named the order's membership; its cancellation found it by listing: the
    order names no other membership, so `cancel` of the found one acts on it."""
    bought = purchase(runtime, simulator)
    with runtime.database.transaction() as session:
        order = session.get(Order, bought.order_id)
        assert order is not None
        order.whop_membership_id = None
    result = cancel_membership(runtime, bought.membership_id)
    assert (result.status, result.order_id) == ("canceled", bought.order_id)
    assert whop_calls(simulator) == ["POST 200"]


def test_cancel_of_an_unknown_membership_is_refused(
    runtime: Runtime, simulator: SimulatorServer
) -> None:
    purchase(runtime, simulator)
    with pytest.raises(CancelRefused, match="no order has membership mem_Nobody1; whop-autocancel"):
        cancel_membership(runtime, "mem_Nobody1")
    assert simulator.state.calls() == []


# The commands -------------------------------------------------------------------------------


@dataclass
class Cli:
    app: typer.Typer
    runtime: Runtime
    simulator: SimulatorServer

    def __call__(self, *args: str, stdin: str | None = None) -> Any:
        return CliRunner().invoke(self.app, list(args), input=stdin)


@pytest.fixture
def cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, simulator: SimulatorServer
) -> Iterator[Cli]:
    """The commands on an app of their own, configured through the environment like the
    real command (SQLite in tmp_path); `runtime` shares its database and queue."""
    from whop_autocancel.cli.common import out

    environment = service_environment(tmp_path, WHOP_API_URL=simulator.api_url)
    for name in list(os.environ):
        if name not in environment:
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    # Wide enough that no id is folded, whatever terminal the tests run in.
    monkeypatch.setattr(out, "_width", 250)
    monkeypatch.setattr(out, "_height", 50)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the command points logging at its stderr
    runtime = make_runtime(make_settings(tmp_path, WHOP_API_URL=simulator.api_url))
    try:
        yield Cli(cli_app, runtime, simulator)
    finally:
        runtime.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def failure(result: Any) -> str:
    """The message `cli.main()` prints for the error a command raised (exit 1)."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, WhopAutocancelError), result.exception
    return str(result.exception)


def test_orders_command_prints_a_table(cli: Cli) -> None:
    bought = purchase(cli.runtime, cli.simulator)
    other = purchase(cli.runtime, cli.simulator, plan=UNLISTED_PLAN)
    listing = cli("orders")
    assert listing.exit_code == 0, listing.output
    assert "2 order(s), newest first" in listing.stdout
    lines = listing.stdout.splitlines()
    [mine] = [line for line in lines if bought.order_id in line]
    for text in (
        "delivered",
        MESSAGE_PLAN,
        bought.email,
        bought.payment_id,
        bought.membership_id,
        "scheduled (#1)",
    ):
        assert text in mine
    assert lines.index(mine) > next(i for i, line in enumerate(lines) if other.order_id in line)

    filtered = cli("orders", "--status", "paid", "--email", other.email.upper())
    assert filtered.exit_code == 0, filtered.output
    assert f"1 order(s) with status paid and email {other.email.upper()}" in filtered.stdout
    assert other.order_id in filtered.stdout
    assert bought.order_id not in filtered.stdout
    assert cli("orders", "--email", "nobody@example.com").stdout.strip() == (
        "No orders with email nobody@example.com."
    )
    bad = cli("orders", "--status", "shipped")
    assert bad.exit_code == 2
    assert "'shipped' is not one of 'pending', 'paid', 'delivered'" in " ".join(bad.output.split())


def test_events_commands_list_replay_and_ignore(cli: Cli) -> None:
    failed = broken_payment(cli.runtime)
    handled = ingest(cli.runtime, payment_body())

    listing = cli("events", "list", "--status", "failed")
    assert listing.exit_code == 0, listing.output
    assert "1 event(s) with status failed, newest first" in listing.stdout
    [line] = [line for line in listing.stdout.splitlines() if failed in line]
    for text in ("payment.succeeded", "failed", " 1 ", "EventDataError: payment has no id"):
        assert text in line
    assert handled not in listing.stdout
    assert "events replay ID" in listing.stdout

    replayed = cli("events", "replay", handled)
    assert replayed.exit_code == 0, replayed.output
    assert replayed.stdout.strip() == (
        f"Event {handled} (payment.succeeded) was already handled; applied again. "
        "Nothing changed (applying an event is idempotent)."
    )
    still = failure(cli("events", "replay", failed))
    assert still.startswith(
        f"event {failed} (payment.succeeded) still fails to apply: EventDataError: payment has "
        "no id. It stays failed (attempt 2)"
    )
    assert failure(cli("events", "replay", "msg_Missing1")).startswith("no event msg_Missing1")

    refused = failure(cli("events", "ignore", handled))
    assert f"event {handled} (payment.succeeded) was handled at " in refused
    ignored = cli("events", "ignore", failed)
    assert ignored.exit_code == 0, ignored.output
    assert ignored.stdout.startswith(
        f"Event {failed} (payment.succeeded) marked ignored (it was failed); the sweep no "
        "longer retries it."
    )
    assert cli("events", "ignore", failed).stdout.strip() == (
        f"Event {failed} (payment.succeeded) is already ignored; nothing to do."
    )
    assert cli("events", "list", "--status", "failed").stdout.strip() == (
        "No events with status failed."
    )


def test_cancel_command_asks_then_cancels_once(cli: Cli) -> None:
    bought = purchase(cli.runtime, cli.simulator)
    declined = cli("cancel", bought.membership_id, stdin="n\n")
    assert f"Cancel Whop membership {bought.membership_id} of order {bought.order_id}" in (
        declined.stdout
    )
    assert failure(declined) == f"membership {bought.membership_id} not cancelled"
    assert whop_calls(cli.simulator) == []
    unanswered = cli("cancel", bought.membership_id, stdin="")  # no terminal: input ends
    assert failure(unanswered) == f"membership {bought.membership_id} not cancelled"
    assert whop_calls(cli.simulator) == []

    done = cli("cancel", bought.membership_id, stdin="y\n")
    assert done.exit_code == 0, done.output
    assert (
        f"Membership {bought.membership_id} (order {bought.order_id}) canceled in Whop "
        "(cancellation #1, attempt generation 1)." in done.stdout
    )
    assert whop_calls(cli.simulator) == ["POST 200"]

    again = cli("cancel", bought.membership_id, "--yes")
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == (
        f"Membership {bought.membership_id} (order {bought.order_id}) is already canceled "
        "(cancellation #1); Whop was not called."
    )
    assert whop_calls(cli.simulator) == ["POST 200"]


def test_cancel_command_failures_exit_1_with_the_reason(cli: Cli) -> None:
    renewal = purchase(cli.runtime, cli.simulator, billing_reason="subscription_create")
    refused = failure(cli("cancel", renewal.membership_id, "--yes"))
    assert refused == (
        f"membership {renewal.membership_id} (order {renewal.order_id}) not cancelled: its "
        "payment's billing reason is 'subscription_create', not 'one_time': subscriptions are "
        "never cancelled; Whop was not called"
    )
    unknown = failure(cli("cancel", "mem_Nobody1", "--yes"))
    assert unknown.startswith(
        "no order has membership mem_Nobody1; whop-autocancel only cancels memberships of "
        "orders it knows"
    )

    bought = purchase(cli.runtime, cli.simulator)
    cli.simulator.state.reject(bought.membership_id, 404)
    failed = failure(cli("cancel", bought.membership_id, "--yes"))
    assert failed.startswith(
        f"membership {bought.membership_id} (order {bought.order_id}) not cancelled: the "
        "cancellation #1, attempt generation 1 is failed: Whop has no membership"
    )
    assert whop_calls(cli.simulator) == ["POST 404"]


def test_orders_show_answers_what_happened_to_a_buyer(cli: Cli, tmp_path: Path) -> None:
    bought = purchase(cli.runtime, cli.simulator)
    other = purchase(cli.runtime, cli.simulator)
    assert cli("cancel", bought.membership_id, "--yes").exit_code == 0

    shown = cli("orders", "show", bought.email.upper())
    assert shown.exit_code == 0, shown.output
    text = shown.stdout
    assert text.startswith(f"Order {bought.order_id}: delivered\n")
    for expected in (
        bought.payment_id,
        bought.membership_id,
        "webhook payment.succeeded",
        "paid: payment",
        "delivered by message",
        f"POST /memberships/{bought.membership_id}/cancel → 200 (success); cancellation canceled",
        "Idempotency-Key cancel-",
        f"membership.cancel {bought.membership_id} by cli:",
        f"membership {bought.membership_id} canceled",
    ):
        assert expected in text, expected
    assert other.order_id not in text

    document = json.loads(cli("orders", "show", bought.payment_id, "--json").stdout)
    assert document["order"]["id"] == bought.order_id
    assert document["cancellation"]["status"] == "canceled"
    sources = [entry["source"] for entry in document["timeline"]]
    # The story starts with the webhook (stored) and the order its apply created, a moment later.
    assert set(sources[:2]) == {"event", "order"}
    assert {"event", "match", "delivery", "attempt", "admin"} <= set(sources)
    [attempt] = [entry for entry in document["timeline"] if entry["source"] == "attempt"]
    assert attempt["http_status"] == 200
    assert attempt["idempotency_key"].startswith("cancel-")

    missing = cli("orders", "show", "nobody@example.com")
    assert missing.exit_code == 1
    assert "no purchase matches 'nobody@example.com'" in failure(missing)

    # Through a pipe at 80 columns, as `orders show … | less` sees it: ids whole on their lines.
    piped = run_cli(
        tmp_path,
        "orders",
        "show",
        bought.order_id,
        env={**service_environment(tmp_path), "COLUMNS": "80"},
    )
    assert piped.returncode == 0, piped.stderr
    for one in (bought.order_id, bought.payment_id, bought.membership_id):
        assert any(one in line for line in piped.stdout.splitlines()), one


def test_the_installed_command_has_the_recovery_commands(tmp_path: Path) -> None:
    make_runtime(make_settings(tmp_path)).close()
    listing = run_cli(tmp_path, "events", "list")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.strip() == "No events."
    missing = run_cli(tmp_path, "events", "replay", "msg_Missing1")
    assert missing.returncode == 1
    assert (
        missing.stderr.strip().splitlines()[-1].startswith("whop-autocancel: no event msg_Missing1")
    )
