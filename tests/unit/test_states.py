"""The order state machine (DESIGN §5, "Order states")."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import product

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.orders.states import ALLOWED_TRANSITIONS, can_transition, transition

S = OrderStatus
RANK = {
    S.PENDING: 0,
    S.ABANDONED: 0.5,  # closed for guesses; a payment that names the order still pays it
    S.PAID: 1,
    S.DELIVERY_FAILED: 2,
    S.DELIVERED: 3,
    S.REFUNDED: 4,
    S.DISPUTED: 4,
}
TERMINAL = {S.REFUNDED, S.DISPUTED}

# DESIGN §5: pending → paid → delivered, paid → delivery_failed → delivered,
# paid|delivered|delivery_failed → refunded|disputed; and pending → refunded|disputed, because a
# refund or dispute can arrive before its payment's webhook; pending → abandoned (checkout never
# created, or not paid within PENDING_ORDER_TTL) and abandoned → paid|refunded|disputed (only a
# payment that names the order reaches it). Nothing else.
EXPECTED_EDGES = {
    (S.PENDING, S.PAID),
    (S.PAID, S.DELIVERED),
    (S.PAID, S.DELIVERY_FAILED),
    (S.DELIVERY_FAILED, S.DELIVERED),
    (S.PENDING, S.ABANDONED),
    (S.ABANDONED, S.PAID),
    *((S.ABANDONED, target) for target in TERMINAL),
    *(
        (source, target)
        for source in (S.PENDING, S.PAID, S.DELIVERED, S.DELIVERY_FAILED)
        for target in TERMINAL
    ),
}


def make_order(status: OrderStatus = S.PENDING) -> Order:
    return Order(id="ord_x", status=status.value, created_at=datetime.now(UTC), order_metadata={})


def test_table_covers_every_status() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(OrderStatus)


def test_table_is_exactly_the_design() -> None:
    edges = {
        (source, target) for source, targets in ALLOWED_TRANSITIONS.items() for target in targets
    }
    assert edges == EXPECTED_EDGES


def test_can_transition_matches_the_design() -> None:
    for source, target in product(OrderStatus, OrderStatus):
        expected = (source, target) in EXPECTED_EDGES
        assert can_transition(source.value, target) is expected, (source, target)


@pytest.mark.parametrize(("source", "target"), sorted(EXPECTED_EDGES))
def test_allowed_transition_moves_the_order(source: OrderStatus, target: OrderStatus) -> None:
    order = make_order(source)
    assert transition(order, target, "test") is True
    assert order.status == target.value


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (source, target)
        for source, target in product(OrderStatus, OrderStatus)
        if (source, target) not in EXPECTED_EDGES
    ],
)
def test_disallowed_transition_leaves_the_order(source: OrderStatus, target: OrderStatus) -> None:
    order = make_order(source)
    assert transition(order, target, "test") is False
    assert order.status == source.value


def test_happy_path() -> None:
    order = make_order()
    assert transition(order, S.PAID, "payment.succeeded")
    assert transition(order, S.DELIVERED, "delivered")
    assert order.status == "delivered"


def test_stock_arrives_after_delivery_failed() -> None:
    order = make_order(S.PAID)
    assert transition(order, S.DELIVERY_FAILED, "no stock")
    assert transition(order, S.DELIVERED, "stock arrived")
    assert order.status == "delivered"


def test_late_paid_after_delivered_is_ignored() -> None:
    order = make_order(S.DELIVERED)
    assert transition(order, S.PAID, "late payment.succeeded") is False
    assert order.status == "delivered"


def test_pending_cannot_skip_to_delivered() -> None:
    order = make_order()
    assert transition(order, S.DELIVERED, "delivery before payment") is False
    assert order.status == "pending"


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_refunded_and_disputed_are_terminal(terminal: OrderStatus) -> None:
    for target in OrderStatus:
        order = make_order(terminal)
        assert transition(order, target, "after the end") is False
        assert order.status == terminal.value


def test_same_status_is_a_no_op() -> None:
    order = make_order(S.PAID)
    assert transition(order, S.PAID, "duplicate") is False
    assert order.status == "paid"


def test_can_transition_takes_the_stored_string() -> None:
    assert can_transition("paid", S.DELIVERED)
    assert not can_transition("delivered", S.PAID)


@settings(max_examples=150, deadline=None)
@given(targets=st.lists(st.sampled_from(list(OrderStatus)), max_size=25))
def test_no_sequence_of_attempts_moves_an_order_backwards(targets: list[OrderStatus]) -> None:
    order = make_order()
    for target in targets:
        before = OrderStatus(order.status)
        moved = transition(order, target, "property")
        after = OrderStatus(order.status)
        assert moved is (after != before)
        assert moved is ((before, target) in EXPECTED_EDGES)
        assert RANK[after] >= RANK[before]
        if before in TERMINAL:
            assert after == before
        if moved:
            assert after == target
