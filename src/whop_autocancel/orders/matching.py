"""Finding the order a payment belongs to (DESIGN §5, five steps, first match wins)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from whop_autocancel.orders.models import Order, OrderStatus
from whop_autocancel.webhooks.parse import PaymentFacts


@dataclass(frozen=True)
class Match:
    order: Order | None
    step: str  # which rule found it, or why none did


def find_order_for_payment(
    session: Session, facts: PaymentFacts, window_seconds: float, fallback_time: datetime
) -> Match:
    """1 payment id; 2 metadata.order_id; 3 checkout configuration; 4 membership id;
    5 the only pending order of the plan created within the window before the payment."""
    order = _one(session, select(Order).where(Order.whop_payment_id == facts.payment_id))
    if order is not None:
        return Match(order, "payment_id")
    unpaid = Order.whop_payment_id.is_(None)
    if facts.order_id:
        order = _one(session, select(Order).where(Order.id == facts.order_id, unpaid))
        if order is not None:
            return Match(order, "metadata.order_id")
    if facts.checkout_configuration_id:
        order = _one(
            session,
            select(Order)
            .where(Order.checkout_configuration_id == facts.checkout_configuration_id, unpaid)
            .order_by(Order.created_at),
        )
        if order is not None:
            return Match(order, "checkout_configuration_id")
    if facts.membership_id:
        order = _one(
            session,
            select(Order)
            .where(Order.whop_membership_id == facts.membership_id, unpaid)
            .order_by(Order.created_at),
        )
        if order is not None:
            return Match(order, "membership_id")
    if not facts.plan_id:
        return Match(None, "no plan id to match a pending order")
    reference = facts.created_at or facts.paid_at or fallback_time
    conditions = [
        unpaid,
        Order.status == OrderStatus.PENDING.value,
        Order.plan_id == facts.plan_id,
        Order.created_at >= reference - timedelta(seconds=window_seconds),
        Order.created_at <= reference,
        # A pending order that already names another membership or checkout is someone else's.
        or_(Order.whop_membership_id.is_(None), Order.whop_membership_id == facts.membership_id),
        or_(
            Order.checkout_configuration_id.is_(None),
            Order.checkout_configuration_id == facts.checkout_configuration_id,
        ),
    ]
    if facts.email:
        conditions.append(or_(Order.email.is_(None), func.lower(Order.email) == facts.email))
    candidates = list(session.scalars(select(Order).where(*conditions).limit(2)))
    if len(candidates) == 1:
        return Match(candidates[0], "pending order in window")
    if len(candidates) > 1:
        return Match(None, "several pending orders in window: not guessing, new order")
    return Match(None, "no matching order: new order")


def _one(session: Session, statement: object) -> Order | None:
    return session.scalars(statement.limit(1)).first()  # type: ignore[attr-defined]
