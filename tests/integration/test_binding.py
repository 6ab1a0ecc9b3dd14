"""Binding invariants (DESIGN §5): an order is bound to at most one payment and one membership,
for ever; a payment or event that contradicts a binding never joins that order; the window rule
guesses only for orders whose checkout exists and whose email is the payment's. Real databases
(all three), the webhook route over real HTTP."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from support.facts import membership_facts, payment_facts
from support.harness import (
    MESSAGE_PLAN,
    UNLISTED_PLAN,
    ServiceServer,
    apply_webhooks,
    claim_event,
    drain,
    event_body,
    make_runtime,
    make_settings,
    post_event,
)
from whop_autocancel.alerts.models import Alert
from whop_autocancel.cancellation.models import Cancellation
from whop_autocancel.clock import FrozenClock
from whop_autocancel.orders.models import Order
from whop_autocancel.orders.service import new_order_id
from whop_autocancel.runtime import Runtime
from whop_autocancel.webhooks.models import WebhookEvent
from whop_autocancel.whop.payloads import MembershipFacts, PaymentFacts


@dataclass
class Service:
    runtime: Runtime
    http: httpx.Client
    clock: FrozenClock

    def orders(self) -> list[Order]:
        with self.runtime.database.transaction() as session:
            return list(session.scalars(select(Order).order_by(Order.created_at, Order.id)))

    def order(self, order_id: str) -> Order:
        with self.runtime.database.transaction() as session:
            found = session.get(Order, order_id)
            assert found is not None
            return found

    def by_payment(self, payment_id: str) -> Order:
        with self.runtime.database.transaction() as session:
            return session.scalars(select(Order).where(Order.whop_payment_id == payment_id)).one()

    def alerts(self, kind: str) -> list[Alert]:
        with self.runtime.database.transaction() as session:
            return list(session.scalars(select(Alert).where(Alert.kind == kind)))

    def deliver(self, body: bytes, **options: Any) -> httpx.Response:
        """Post a signed webhook, then apply it as the worker would."""
        response = post_event(self.http, body, **options)
        apply_webhooks(self.runtime)
        return response

    def event_status(self, body: bytes) -> str:
        with self.runtime.database.transaction() as session:
            event = session.get(WebhookEvent, json.loads(body)["id"])
            assert event is not None
            return event.status

    def pay(self, facts: PaymentFacts) -> Order:
        with self.runtime.database.transaction() as session:
            return self.runtime.orders.apply_payment(session, facts, self.clock.now())

    def activate(self, facts: MembershipFacts) -> Order:
        with self.runtime.database.transaction() as session:
            return self.runtime.orders.apply_membership_live(session, facts, self.clock.now())

    def pending(self, created_at: datetime, **fields: Any) -> str:
        order_id = new_order_id()
        with self.runtime.database.transaction() as session:
            session.add(
                Order(
                    id=order_id,
                    status=fields.pop("status", "pending"),
                    created_at=created_at,
                    plan_id=fields.pop("plan_id", MESSAGE_PLAN),
                    order_metadata={},
                    **fields,
                )
            )
        return order_id


@pytest.fixture
def service(tmp_path: Path, clock: FrozenClock, database_url: str) -> Iterator[Service]:
    runtime = make_runtime(make_settings(tmp_path, DATABASE_URL=database_url), clock)
    server = ServiceServer(runtime)
    with server.running(), httpx.Client(base_url=server.url, timeout=10) as http:
        yield Service(runtime, http, clock)
    runtime.close()


payment = payment_facts


def membership(**changes: Any) -> MembershipFacts:
    """A membership that is already `completed` (one-time access granted) unless changed."""
    return membership_facts(**({"status": "completed"} | changes))


# The window rule (finding 1) ----------------------------------------------------------------


def test_an_order_whose_checkout_was_never_created_is_never_guessed(service: Service) -> None:
    """A failed (or in-flight) checkout leaves a pending order without a checkout id: the next
    payment of its plan must not land on it, even with the same email."""
    now = service.clock.now()
    stranger = service.pending(now - timedelta(seconds=30), email="caller@example.com")
    assert service.pay(payment(now, email=None)).id != stranger
    assert service.pay(payment(now, email="caller@example.com")).id != stranger
    assert service.order(stranger).status == "pending"


def test_an_email_less_payment_never_window_matches(service: Service) -> None:
    now = service.clock.now()
    order = service.pending(
        now - timedelta(seconds=30), email="buyer@example.com", checkout_configuration_id="ch_W1"
    )
    assert service.pay(payment(now, email=None)).id != order


def test_an_order_without_an_email_is_not_guessed(service: Service) -> None:
    now = service.clock.now()
    order = service.pending(now - timedelta(seconds=30), checkout_configuration_id="ch_W2")
    assert service.pay(payment(now)).id != order


def test_the_window_matches_a_created_checkout_with_the_same_email(service: Service) -> None:
    now = service.clock.now()
    order = service.pending(
        now - timedelta(seconds=30), email="Buyer@Example.com", checkout_configuration_id="ch_W3"
    )
    assert service.pay(payment(now)).id == order


def test_an_abandoned_order_is_not_guessed_but_a_payment_naming_it_pays_it(
    service: Service,
) -> None:
    now = service.clock.now()
    order = service.pending(
        now - timedelta(seconds=30),
        email="buyer@example.com",
        checkout_configuration_id="ch_W4",
        status="abandoned",
    )
    assert service.pay(payment(now)).id != order
    paid = service.pay(payment(now, metadata={"order_id": order}))
    assert (paid.id, paid.status) == (order, "paid")


# Binding conflicts (finding 2) -----------------------------------------------------------------


def test_a_reused_checkout_link_with_the_second_membership_first_is_not_cross_wired(
    service: Service,
) -> None:
    """Buyer buys twice through one checkout link; the second purchase's membership event
    arrives before the first payment. Each order must end with its own payment's membership."""
    now = service.clock.now()
    order_id = service.pending(
        now - timedelta(minutes=1), email="buyer@example.com", checkout_configuration_id="ch_R1"
    )
    link = {"checkout_configuration_id": "ch_R1", "metadata": {"order_id": order_id}}
    service.activate(membership(membership_id="mem_Second", **link))
    first = service.pay(payment(now, payment_id="pay_First", membership_id="mem_First", **link))
    second = service.pay(payment(now, payment_id="pay_Second", membership_id="mem_Second", **link))
    assert first.id != second.id
    for payment_id, membership_id in (("pay_First", "mem_First"), ("pay_Second", "mem_Second")):
        order = service.by_payment(payment_id)
        assert order.whop_membership_id == membership_id
    [conflict] = service.alerts("binding_conflict")
    assert "mem_First" in conflict.text_body
    assert "mem_Second" in conflict.text_body
    drain(service.runtime)
    service.clock.advance(10)
    with service.runtime.database.transaction() as session:
        pairs = {(row.order_id, row.membership_id) for row in session.scalars(select(Cancellation))}
    assert pairs <= {(first.id, "mem_First"), (second.id, "mem_Second")}


def test_a_payment_naming_an_order_of_another_membership_gets_its_own_order(
    service: Service,
) -> None:
    now = service.clock.now()
    order_id = service.pending(
        now - timedelta(minutes=1), whop_membership_id="mem_Bound", checkout_configuration_id="ch_B"
    )
    stranger = service.pay(
        payment(now, membership_id="mem_Stranger", metadata={"order_id": order_id})
    )
    assert stranger.id != order_id
    assert stranger.whop_membership_id == "mem_Stranger"
    bound = service.order(order_id)
    assert (bound.status, bound.whop_membership_id, bound.whop_payment_id) == (
        "pending",
        "mem_Bound",
        None,
    )
    [alert] = service.alerts("binding_conflict")
    assert order_id in alert.text_body
    assert stranger.id in alert.text_body


def test_a_payment_of_another_checkout_never_joins_an_order(service: Service) -> None:
    now = service.clock.now()
    order_id = service.pending(now - timedelta(minutes=1), checkout_configuration_id="ch_Own")
    other = service.pay(
        payment(now, checkout_configuration_id="ch_Other", metadata={"order_id": order_id})
    )
    assert other.id != order_id
    assert service.order(order_id).checkout_configuration_id == "ch_Own"
    assert len(service.alerts("binding_conflict")) == 1


def test_a_membership_event_never_rebinds_an_order(service: Service) -> None:
    now = service.clock.now()
    order_id = service.pending(now - timedelta(minutes=1), whop_membership_id="mem_Kept")
    other = service.activate(membership(membership_id="mem_New", metadata={"order_id": order_id}))
    assert other.id != order_id
    assert service.order(order_id).whop_membership_id == "mem_Kept"


# Membership events of plans we do not sell (finding 8) -----------------------------------------


def test_a_membership_of_an_unlisted_plan_creates_no_order(service: Service) -> None:
    body = event_body(
        "membership.activated.legacy.json",
        plan={"id": UNLISTED_PLAN},
        metadata={},
        checkout_configuration_id=None,
    )
    assert service.deliver(body).json() == {"status": "received"}
    assert service.event_status(body) == "handled"
    assert service.orders() == []


def test_a_membership_of_a_listed_plan_still_waits_for_its_payment(service: Service) -> None:
    body = event_body(
        "membership.activated.legacy.json",
        plan={"id": MESSAGE_PLAN},
        metadata={},
        checkout_configuration_id=None,
    )
    service.deliver(body)
    [order] = service.orders()
    assert order.status == "pending"


def test_pending_orders_nobody_paid_are_closed_after_the_ttl(service: Service) -> None:
    now = service.clock.now()
    ttl = service.runtime.settings.PENDING_ORDER_TTL
    old = service.pending(now - timedelta(seconds=ttl + 1), checkout_configuration_id="ch_Old")
    young = service.pending(now - timedelta(seconds=ttl - 60), checkout_configuration_id="ch_New")
    claimed = service.pending(now - timedelta(seconds=ttl + 1), whop_payment_id="pay_Claimed")
    service.runtime.stuck_sweep.run(force=True)
    assert service.order(old).status == "abandoned"
    assert service.order(young).status == "pending"
    assert service.order(claimed).status == "pending"  # it has a payment: not ours to close
    # A payment naming the closed order still pays it (the buyer paid a valid link late).
    late = service.pay(payment(now, checkout_configuration_id="ch_Old"))
    assert (late.id, late.status) == (old, "paid")


# Claims by status (finding 5) -------------------------------------------------------------------


def payment_event(payment_id: str) -> bytes:
    return event_body(
        "payment.succeeded.legacy.json",
        id=payment_id,
        plan={"id": MESSAGE_PLAN, "metadata": {}},
        metadata={},
        checkout_configuration_id=None,
    )


OPEN_CLAIMS = [
    ("refund", "pending"),
    ("refund", "failed"),
    ("refund", "canceled"),
    ("refund", None),
    ("dispute", "needs_response"),
    ("dispute", "warning_needs_response"),
    ("dispute", "under_review"),
    ("dispute", "won"),
]


@pytest.mark.parametrize(("kind", "status"), OPEN_CLAIMS)
def test_a_claim_that_did_not_take_the_money_back_blocks_nothing(
    service: Service, kind: str, status: str | None
) -> None:
    payment_id = f"pay_{uuid.uuid4().hex[:10]}"
    # Even before its payment: the claim waits for it (stored, applied again later).
    early = claim_event(kind, payment_id, status, event="updated")
    assert service.deliver(early).json() == {"status": "received"}
    assert service.event_status(early) == "failed"
    assert service.orders() == []
    service.deliver(payment_event(payment_id))
    drain(service.runtime)
    order = service.by_payment(payment_id)
    assert order.status == "delivered"
    service.clock.advance(60)
    service.runtime.stuck_sweep.run(force=True)  # re-applies the claim, now its payment is in
    drain(service.runtime)
    order = service.by_payment(payment_id)
    assert order.status == "delivered"
    assert [entry["status"] for entry in order.order_metadata[f"{kind}s"]] == [status]
    assert len(service.alerts(f"order_{kind}ed" if kind == "refund" else "order_disputed")) == 1
    with service.runtime.database.transaction() as session:
        [row] = list(session.scalars(select(Cancellation)))
    service.runtime.cancellations.run(row.id)
    with service.runtime.database.transaction() as session:
        ran = session.get(Cancellation, row.id)
    assert ran is not None
    assert ran.status != "skipped", ran.last_error


def test_a_refund_before_its_payment_leaves_the_payment_to_its_checkout_order(
    service: Service,
) -> None:
    """Found by the model-based test: a pending refund came before its payment (which carries
    no email), and the refund's order captured the payment, leaving the buyer's checkout order
    (with their email) behind: nothing could be delivered."""
    now = service.clock.now()
    order_id = service.pending(
        now - timedelta(minutes=1), email="ann@buyers.test", checkout_configuration_id="ch_Ann"
    )
    body = event_body(
        "payment.succeeded.legacy.json",
        id="pay_Ahead1",
        plan={"id": MESSAGE_PLAN, "metadata": {}},
        user={"id": "user_Ann", "email": None},
        metadata={"order_id": order_id},
        checkout_configuration_id="ch_Ann",
    )
    service.deliver(claim_event("refund", "pay_Ahead1", "pending", event="updated"))
    service.deliver(body)
    drain(service.runtime)
    order = service.by_payment("pay_Ahead1")
    assert (order.id, order.status, order.email) == (order_id, "delivered", "ann@buyers.test")


@pytest.mark.parametrize(
    ("kind", "status", "ends"),
    [("refund", "succeeded", "refunded"), ("dispute", "lost", "disputed")],
)
def test_only_money_gone_back_ends_the_order(
    service: Service, kind: str, status: str, ends: str
) -> None:
    payment_id = f"pay_{uuid.uuid4().hex[:10]}"
    service.deliver(payment_event(payment_id))
    service.deliver(
        claim_event(
            kind,
            payment_id,
            "pending" if kind == "refund" else "needs_response",
            claim_id="cl_1",
            event="updated",
        ),
    )
    assert service.by_payment(payment_id).status == "paid"
    service.deliver(claim_event(kind, payment_id, status, claim_id="cl_1", event="updated"))
    assert service.by_payment(payment_id).status == ends


# Values that can never apply (finding 8) ----------------------------------------------------


def test_a_value_longer_than_its_column_is_stored_failed_not_500(service: Service) -> None:
    body = event_body(
        "payment.succeeded.legacy.json",
        id="pay_" + "x" * 300,
        plan={"id": MESSAGE_PLAN, "metadata": {}},
    )
    response = service.deliver(body)
    assert (response.status_code, response.json()) == (200, {"status": "received"})
    assert service.orders() == []
    with service.runtime.database.transaction() as session:
        [event] = list(session.scalars(select(WebhookEvent)))
    assert "longer than" in (event.last_error or "")
    assert event.next_attempt_at is None  # it can never apply: not retried
    assert len(service.alerts("event_apply_failed")) == 1  # the admin hears at once


def test_a_webhook_id_longer_than_its_column_is_refused(service: Service) -> None:
    body = payment_event("pay_LongId1")
    response = service.deliver(body, webhook_id="msg_" + "y" * 300)
    assert response.status_code == 401
    assert response.json() == {"error": "webhook-id header is too long"}
    assert service.orders() == []
