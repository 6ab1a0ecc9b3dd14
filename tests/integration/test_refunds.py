"""refund.* and dispute.* webhooks: recorded on the order, one alert per claim, and an order
never moves backwards whatever the order of events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from support.harness import (
    MESSAGE_PLAN,
    NONE_PLAN,
    ServiceServer,
    apply_webhooks,
    claim_event,
    deliver_event,
    drain,
    event_body,
    make_runtime,
    make_settings,
    post_event,
)
from support.statements import recorded, verbs
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.orders.models import Order
from whop_autocancel.runtime import Runtime
from whop_autocancel.webhooks.inbox import names_unapplied
from whop_autocancel.webhooks.models import WebhookEvent


@pytest.fixture
def service(
    tmp_path: Path, clock: FrozenClock, database_url: str
) -> Iterator[tuple[Runtime, httpx.Client]]:
    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=database_url), clock)
    server = ServiceServer(runtime)
    with server.running(), httpx.Client(base_url=server.url, timeout=10) as http:
        yield runtime, http
    runtime.close()


def payment(payment_id: str) -> bytes:
    return event_body(
        "payment.succeeded.legacy.json",
        id=payment_id,
        plan={"id": MESSAGE_PLAN, "metadata": {}},
        metadata={},
        checkout_configuration_id=None,
    )


def no_email_payment(payment_id: str) -> bytes:
    """A payment of the `none` plan: delivered without an email for the cancellation to wait
    for."""
    return event_body(
        "payment.succeeded.legacy.json",
        id=payment_id,
        plan={"id": NONE_PLAN, "metadata": {}},
        metadata={},
        checkout_configuration_id=None,
    )


def the_order(runtime: Runtime, payment_id: str) -> Order:
    with runtime.database.transaction() as session:
        return session.scalars(select(Order).where(Order.whop_payment_id == payment_id)).one()


def event_status(runtime: Runtime, body: bytes) -> str:
    with runtime.database.transaction() as session:
        event = session.get(WebhookEvent, json.loads(body)["id"])
        assert event is not None
        return event.status


def run_cancellation(runtime: Runtime, clock: FrozenClock, cancellation_id: int) -> Cancellation:
    """CANCEL_DELAY passes, the cancellation runs once: its row afterwards."""
    clock.advance(5)
    runtime.cancellations.run(cancellation_id)
    with runtime.database.transaction() as session:
        row = session.get(Cancellation, cancellation_id)
        assert row is not None
        return row


def kinds(runtime: Runtime) -> list[str]:
    with runtime.database.transaction() as session:
        return [a.kind for a in session.scalars(select(Alert).order_by(Alert.id))]


def test_a_refund_after_delivery_is_recorded_alerted_once_and_stops_the_cancel(
    service: tuple[Runtime, httpx.Client], clock: FrozenClock
) -> None:
    runtime, http = service
    deliver_event(runtime, http, payment("pay_Refund1"))
    drain(runtime)
    assert the_order(runtime, "pay_Refund1").status == "delivered"
    pending = claim_event("refund", "pay_Refund1", claim_id="rf_1")
    assert deliver_event(runtime, http, pending).json() == {"status": "received"}
    assert event_status(runtime, pending) == "handled"
    deliver_event(
        runtime,
        http,
        claim_event("refund", "pay_Refund1", "succeeded", claim_id="rf_1", event="updated"),
    )
    order = the_order(runtime, "pay_Refund1")
    assert order.status == "refunded"
    assert [(r["id"], r["status"]) for r in order.order_metadata["refunds"]] == [
        ("rf_1", "succeeded")
    ]
    # One while the refund is pending (nothing changes), one when it succeeds: not one per event.
    deliver_event(
        runtime,
        http,
        claim_event("refund", "pay_Refund1", "succeeded", claim_id="rf_1", event="updated"),
    )
    assert kinds(runtime) == ["order_refunded", "order_refunded"]
    with runtime.database.transaction() as session:
        row = session.scalars(select(Cancellation)).one()
    row = run_cancellation(runtime, clock, row.id)
    assert (row.status, row.last_error) == ("skipped", "the order is refunded")


def test_a_refund_before_its_payment_means_the_payment_delivers_nothing(
    service: tuple[Runtime, httpx.Client],
) -> None:
    runtime, http = service
    deliver_event(
        runtime,
        http,
        claim_event("refund", "pay_Early1", "succeeded", claim_id="rf_2", event="created"),
    )
    deliver_event(runtime, http, payment("pay_Early1"))
    drain(runtime)
    order = the_order(runtime, "pay_Early1")
    assert order.status == "refunded"
    assert order.delivered_at is None
    with runtime.database.transaction() as session:
        assert session.scalars(select(Cancellation)).first() is None


def test_a_dispute_is_recorded_and_a_late_payment_does_not_undo_it(
    service: tuple[Runtime, httpx.Client],
) -> None:
    runtime, http = service
    deliver_event(runtime, http, payment("pay_Dispute1"))
    deliver_event(
        runtime,
        http,
        claim_event("dispute", "pay_Dispute1", "lost", claim_id="dp_1", event="created"),
    )
    duplicate_payment = json.loads(payment("pay_Dispute1"))
    deliver_event(runtime, http, json.dumps(duplicate_payment).encode())
    order = the_order(runtime, "pay_Dispute1")
    assert order.status == "disputed"
    assert order.order_metadata["disputes"][0]["id"] == "dp_1"
    with runtime.database.transaction() as session:
        [alert] = list(session.scalars(select(Alert)))
    assert alert.kind == "order_disputed"
    assert "Answer the dispute in Whop" in alert.text_body


def test_a_claim_without_a_payment_id_is_stored_failed(
    service: tuple[Runtime, httpx.Client],
) -> None:
    runtime, http = service
    body = json.dumps({"id": "msg_claim_bad", "type": "refund.created", "data": {"id": "rf"}})
    assert deliver_event(runtime, http, body.encode()).json() == {"status": "received"}
    assert event_status(runtime, body.encode()) == "failed"


def test_a_stored_dispute_not_applied_yet_holds_the_cancellation_until_it_is(
    service: tuple[Runtime, httpx.Client], clock: FrozenClock
) -> None:
    """Whop told of the dispute before the cancellation's time came, but no worker has applied
    the stored webhook yet: the cancellation waits for it (no call, no attempt spent), and once
    it is applied the order is disputed and the cancellation is skipped."""
    runtime, http = service
    body = no_email_payment("pay_Dispute2")
    deliver_event(runtime, http, body)
    drain(runtime)
    with runtime.database.transaction() as session:
        row = session.scalars(select(Cancellation)).one()
    lost = claim_event("dispute", "pay_Dispute2", "lost", claim_id="dp_2", event="created")
    assert post_event(http, lost).json() == {"status": "received"}  # stored, not applied
    held = run_cancellation(runtime, clock, row.id)
    assert (held.status, held.attempts) == ("scheduled", 0)
    assert "webhook" in (held.last_error or "")
    apply_webhooks(runtime)
    assert the_order(runtime, "pay_Dispute2").status == "disputed"
    done = run_cancellation(runtime, clock, row.id)
    assert (done.status, done.last_error) == ("skipped", "the order is disputed")


def test_only_a_stored_refund_or_dispute_holds_the_cancellation(
    service: tuple[Runtime, httpx.Client], clock: FrozenClock
) -> None:
    """Other webhooks waiting to be applied (a backlog of payments, the purchase's own
    membership events) never hold a cancellation: only a claim can stop it."""
    runtime, http = service
    body = no_email_payment("pay_Dispute3")
    deliver_event(runtime, http, body)
    drain(runtime)
    with runtime.database.transaction() as session:
        row = session.scalars(select(Cancellation)).one()
    again = json.loads(body)
    again["id"] = "msg_same_payment_again"  # the same payment, told again: not applied yet
    assert post_event(http, json.dumps(again).encode()).json() == {"status": "received"}
    tried = run_cancellation(runtime, clock, row.id)
    assert tried.attempts == 1  # it called Whop (unreachable here), it did not wait
    assert "webhook" not in (tried.last_error or "")


def test_a_stored_claim_holds_only_the_purchase_it_names_exactly(
    service: tuple[Runtime, httpx.Client],
) -> None:
    """The search of the stored claims' bodies matches an id as written: `_` and `%` in an id
    (every Whop id has a `_`) match only themselves, not any character."""
    runtime, http = service
    assert post_event(http, claim_event("refund", "pay_Exact1", claim_id="rf_9")).json() == {
        "status": "received"
    }
    with runtime.database.transaction() as session:
        assert names_unapplied(session, ["pay_Exact1"])
        assert names_unapplied(session, ["mem_Other", "pay_Exact1"])
        assert not names_unapplied(session, ["payXExact1"])  # `_` is not a wildcard
        assert not names_unapplied(session, ["pay%1"])  # nor `%`
        assert not names_unapplied(session, ["pay_Exact"])  # a prefix is another id


def test_a_chunk_applies_its_good_events_when_one_of_them_fails(
    service: tuple[Runtime, httpx.Client],
) -> None:
    """Events are applied a chunk to a transaction, without a savepoint each: one that fails
    rolls the chunk back and it is applied again with savepoints, so the failed event alone
    ends `failed` and the others are applied, once."""
    runtime, http = service
    first, second = payment("pay_Chunk1"), payment("pay_Chunk2")
    bad = json.dumps({"id": "msg_chunk_bad", "type": "refund.created", "data": {"id": "rf"}})
    for body in (first, bad.encode(), second):
        assert post_event(http, body).json() == {"status": "received"}  # stored, not applied
    apply_webhooks(runtime)
    assert [event_status(runtime, body) for body in (first, bad.encode(), second)] == [
        "handled",
        "failed",
        "handled",
    ]
    assert the_order(runtime, "pay_Chunk1").status == "paid"
    assert the_order(runtime, "pay_Chunk2").status == "paid"


def test_a_chunk_of_events_that_apply_takes_no_savepoint(
    service: tuple[Runtime, httpx.Client],
) -> None:
    """The common case pays for no savepoint (SQLite and PostgreSQL: MariaDB takes one for
    each row it inserts once, see `insert_once`)."""
    runtime, http = service
    if runtime.database.backend == "mysql":
        pytest.skip("MariaDB inserts rows once in savepoints")
    for payment_id in ("pay_Plain1", "pay_Plain2"):
        assert post_event(http, payment(payment_id)).json() == {"status": "received"}
    with recorded(runtime.database.engine) as sent:
        apply_webhooks(runtime)
    assert the_order(runtime, "pay_Plain2").status == "paid"
    assert "SAVEPOINT" not in verbs(sent)
