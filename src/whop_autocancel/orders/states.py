"""The order state machine, as one table. Status never moves backwards."""

from __future__ import annotations

import structlog

from whop_autocancel.orders.models import Order, OrderStatus

log = structlog.get_logger(__name__)

S = OrderStatus
ALLOWED_TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    # A refund or dispute can come before the payment's own webhook (no ordering guarantee).
    S.PENDING: frozenset({S.PAID, S.REFUNDED, S.DISPUTED, S.ABANDONED}),
    # Only a payment that names the order (metadata order id, its checkout) reopens it.
    S.ABANDONED: frozenset({S.PAID, S.REFUNDED, S.DISPUTED}),
    S.PAID: frozenset({S.DELIVERED, S.DELIVERY_FAILED, S.REFUNDED, S.DISPUTED}),
    S.DELIVERY_FAILED: frozenset({S.DELIVERED, S.REFUNDED, S.DISPUTED}),
    S.DELIVERED: frozenset({S.REFUNDED, S.DISPUTED}),
    S.REFUNDED: frozenset(),
    S.DISPUTED: frozenset(),
}


def can_transition(current: str, target: OrderStatus) -> bool:
    return target in ALLOWED_TRANSITIONS.get(OrderStatus(current), frozenset())


def transition(order: Order, target: OrderStatus, reason: str) -> bool:
    """Move `order` to `target` if the table allows it; otherwise log and leave it."""
    if order.status == target:
        return False
    if not can_transition(order.status, target):
        log.info(
            "order_transition_ignored",
            order_id=order.id,
            current=order.status,
            target=target.value,
            reason=reason,
        )
        return False
    log.info(
        "order_transition",
        order_id=order.id,
        current=order.status,
        target=target.value,
        reason=reason,
    )
    order.status = target.value
    return True
